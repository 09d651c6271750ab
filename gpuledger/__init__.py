"""gpuledger: GPU cost telemetry from the hardware up."""

__version__ = "0.1.0"
