"""The NVML wrapper: every NVML call goes through `Nvml.call`, which sorts errors (as nvitop does):

- absent (`Absent`): a function or field this GPU or driver lacks (NOT_SUPPORTED, FUNCTION_NOT_FOUND,
  NO_PERMISSION, ...; or a function this nvidia-ml-py does not have): the reading is NaN, logged once
  per device and field, and recorded in `absent`;
- device down (`DeviceDown`): any other error of a device call (GPU lost, reset required, ...): the
  caller marks the device unhealthy and keeps the others running;
- fatal (`NvmlUnavailable`): NVML cannot start (no library, no driver, version mismatch, no
  permission): a message that says what to install or fix.

The module (`pynvml` or a fake with the same names) is a parameter. This is the only place that
knows NVML's error codes; nvml.py (the device model) calls through it.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("gpuledger.agent.nvml")

_HINTS = {
    "LIBRARY_NOT_FOUND": "libnvidia-ml.so.1 was not found: install the NVIDIA driver (it ships NVML); in a "
                         "container, run with the NVIDIA Container Toolkit (docker --gpus all, or "
                         "runtimeClassName: nvidia on Kubernetes)",
    "DRIVER_NOT_LOADED": "the NVIDIA kernel driver is not loaded: check `nvidia-smi`, `lsmod | grep nvidia` "
                         "and dmesg",
    "LIB_RM_VERSION_MISMATCH": "the NVML library and the kernel driver have different versions (driver "
                               "upgraded without a reboot): reboot or reload the nvidia kernel modules",
    "NO_PERMISSION": "no permission to open /dev/nvidia*: run the agent as root or as a user that may "
                     "open the GPU devices",
}


class NvmlUnavailable(RuntimeError):
    """Fatal: NVML cannot be used on this machine. The message says what to install or fix."""


class Absent(Exception):
    """A function or field this device or driver lacks; `code` is NVML's return code (None: no such function)."""

    def __init__(self, what: str, code: int | None = None) -> None:
        super().__init__(what)
        self.code = code


class DeviceDown(Exception):
    """The device stopped answering (lost, reset required, ...)."""


def text(v) -> str:
    """An NVML string (bytes in older nvidia-ml-py) as str."""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _missing(name: str):
    def fn(*_a, **_k):
        raise AttributeError(f"this nvidia-ml-py has no {name}")

    fn.__name__ = name
    return fn


class Nvml:
    """One NVML module behind the error-sorting call; counts and times calls when `measure_calls`."""

    def __init__(self, nv, *, measure_calls: bool = False) -> None:
        self.nv = nv
        self.measure_calls = measure_calls
        self.call_stats: dict[str, list] = {}  # NVML function -> [calls, total ns, max ns] (measure_calls)
        self.absent: dict[str, set] = {}  # uuid -> fields/functions absent on this device
        self._logged: set = set()

        def code(name: str, default: int) -> int:
            return int(getattr(nv, f"NVML_ERROR_{name}", default))

        self.E_NOT_FOUND = code("NOT_FOUND", 6)
        self.unsupported_codes = {code("NOT_SUPPORTED", 3), code("FUNCTION_NOT_FOUND", 13)}
        self._absent_codes = {code(n, d) for n, d in (("NOT_SUPPORTED", 3), ("FUNCTION_NOT_FOUND", 13),
                                                      ("NO_PERMISSION", 4), ("NO_DATA", 21),
                                                      ("ARGUMENT_VERSION_MISMATCH", 25), ("DEPRECATED", 26),
                                                      ("INVALID_ARGUMENT", 2), ("NOT_FOUND", 6))}
        self._fatal_codes = {code(n, d): n for n, d in (("LIBRARY_NOT_FOUND", 12), ("DRIVER_NOT_LOADED", 9),
                                                         ("LIB_RM_VERSION_MISMATCH", 18), ("NO_PERMISSION", 4))}
        self.NVMLError = getattr(nv, "NVMLError", Exception)

    def init(self) -> None:
        """nvmlInit, or NvmlUnavailable with a hint that says what to fix."""
        try:
            self.nv.nvmlInit()
        except self.NVMLError as e:
            name = self._fatal_codes.get(getattr(e, "value", None))
            hint = _HINTS.get(name or "", "check that the NVIDIA driver works (`nvidia-smi`)")
            raise NvmlUnavailable(f"NVML failed to start ({e}): {hint}") from e

    def call(self, uuid: str | None, what: str, fn, *args, not_found_ok: bool = False):
        """Every NVML call: returns its result, or raises Absent (NaN) or DeviceDown.

        With not_found_ok, NOT_FOUND returns None (no new samples: normal on an idle GPU).
        """
        t0 = time.perf_counter_ns() if self.measure_calls else 0
        try:
            return fn(*args)
        except self.NVMLError as e:
            value = getattr(e, "value", None)
            if value == self.E_NOT_FOUND and not_found_ok:
                return None
            if value in self._absent_codes:
                self.note_absent(uuid, what, e)
                raise Absent(what, value) from e
            raise DeviceDown(f"{what}: {e}") from e
        except AttributeError as e:  # a function this nvidia-ml-py does not have
            self.note_absent(uuid, what, e)
            raise Absent(what) from e
        finally:
            if self.measure_calls:
                dt = time.perf_counter_ns() - t0
                st = self.call_stats.setdefault(getattr(fn, "__name__", what), [0, 0, 0])
                st[0] += 1
                st[1] += dt
                st[2] = max(st[2], dt)

    def opt(self, uuid: str | None, what: str, fn, *args, attr: str | None = None):
        """A call whose absence is fine: its result (or one attribute of it), or None when absent."""
        try:
            v = self.call(uuid, what, fn, *args)
        except Absent:
            return None
        return getattr(v, attr) if attr else v

    def system_text(self, name: str) -> str:
        """A system-wide string (driver version, ...), or '' when NVML does not give it."""
        try:
            return text(self.call(None, name, self.fn(name)))
        except (Absent, DeviceDown):
            return ""

    def note_absent(self, uuid: str | None, what: str, e: Exception) -> None:
        key = (uuid or "", what)
        if key not in self._logged:
            self._logged.add(key)
            self.absent.setdefault(key[0], set()).add(what)
            log.info("%s: %s not available (%s); recorded as missing", uuid or "NVML", what, e)

    def log_once(self, key) -> bool:
        """True the first time `key` is seen (for warnings said once)."""
        if key in self._logged:
            return False
        self._logged.add(key)
        return True

    def fn(self, name: str):
        """The module's function `name`, or one that raises AttributeError (sorted as absent) when called."""
        return getattr(self.nv, name, None) or _missing(name)

    def const(self, name: str, default: int) -> int:
        return int(getattr(self.nv, name, default))
