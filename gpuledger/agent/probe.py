"""`gpuledger agent probe`: what this machine's GPUs and driver give the agent, and at what cost.

Reports the driver, NVML and CUDA versions; for each GPU (or MIG instance) how its utilization is
read (sample buffer and its observed period, rates, GPM, or none), whether it has the energy
counter, GPM and per-process utilization, its MIG state; the measured latency of every NVML call
the agent makes per tick; and whether process environments (the source of process tags) are
readable. Without a driver it returns `ok: False` and a message that says what to install.
"""

from __future__ import annotations

import os
import time

from gpuledger.agent.nvml import NvmlSource, NvmlUnavailable
from gpuledger.clock import Clock, WallClock

_MIG_NONE = ("NVML reports no utilization for MIG instances and this GPU has no GPM: time an instance is held "
             "by a process is recorded as unmonitored (busy and idle cannot be told apart), time with no process "
             "as idle-free")
_MIG_GPM = "utilization of this MIG instance comes from GPM graphics activity (sampled every poll)"


def probe(nvml=None, *, proc_root: str = "/proc", polls: int = 5, interval_s: float = 0.2,
          clock: Clock | None = None) -> dict:
    """Probe NVML; `polls` agent ticks `interval_s` apart measure the per-tick calls."""
    clock = clock or WallClock()
    try:
        src = NvmlSource(nvml, proc_root=proc_root, measure_calls=True)
    except NvmlUnavailable as e:
        return {"ok": False, "error": str(e)}
    try:
        init_calls = {k: v[0] for k, v in src.call_stats.items()}
        src.call_stats.clear()
        pids: list[int] = []
        poll_ns: list[int] = []
        unhealthy: set[int] = set()
        for i in range(max(1, polls)):
            if i:
                clock.sleep(interval_s)
            t0 = time.perf_counter_ns()
            r = src.poll(clock.now_us())
            poll_ns.append(time.perf_counter_ns() - t0)
            unhealthy.update(r.unhealthy)
            for p in r.processes:
                if p.pid not in pids:
                    pids.append(p.pid)
        n = len(poll_ns)
        calls = {name: {"calls_per_tick": round(c / n, 2), "mean_us": round(tot / c / 1e3, 1),
                        "max_us": round(mx / 1e3, 1)}
                 for name, (c, tot, mx) in sorted(src.call_stats.items())}
        gpus = [_gpu_entry(d, pos in unhealthy or d["down"]) for pos, d in enumerate(src.devices())]
        env = _environ_check(src, pids)
        out = {
            "ok": True,
            "driver_version": src.driver_version,
            "nvml_version": src.nvml_version,
            "cuda_driver_version": src.cuda_driver_version,
            "physical_gpus": src.physical_gpu_count,
            "gpus": gpus,
            "ticks_measured": n,
            "call_latency_us": calls,
            "tick_latency_us": {"mean": round(sum(poll_ns) / n / 1e3, 1), "max": round(max(poll_ns) / 1e3, 1)},
            "init_calls": init_calls,
            "process_environ": env,
            "gpu_processes_seen": len(pids),
        }
        return out
    finally:
        src.close()


def _gpu_entry(d: dict, down: bool) -> dict:
    absent = set(d["absent"])
    method = d["util_method"]
    util = {"method": method, "sample_buffer": method == "samples"}
    if method == "samples":
        util["sample_period_us"] = d["sample_period_us"]
        if not d["sample_period_observed"]:
            util["note"] = "no samples buffered yet (an idle GPU may keep none); period assumed 1/6 s"
    elif method == "rates":
        util["note"] = "no sample buffer: nvmlDeviceGetUtilizationRates, each reading covers the time since the " \
                       "previous poll"
    elif method == "gpm":
        util["note"] = _MIG_GPM
    elif d["kind"] == "mig":
        util["note"] = _MIG_NONE
    elif d["kind"] == "mig-free":
        util["note"] = "unallocated MIG slices: no instance, so nothing can run; reported idle-free, priced at " \
                       "their share of the GPU"
    else:
        util["note"] = "NVML gives no utilization for this GPU: its time is unmonitored"
    energy = "energy" not in absent and ("energy" in d["fields_batched"] or "energy" in d["fields_single"])
    power = None
    if "power" in d["fields_batched"]:
        power = "field values (instant)"
    elif "power" in d["fields_single"] and "power" not in absent:
        power = "nvmlDeviceGetPowerUsage"
    entry = {
        "uuid": d["uuid"], "index": d["index"], "name": d["name"], "kind": d["kind"],
        "mem_total_bytes": d.get("mem_total_bytes"), "power_limit_mw": d.get("power_limit_mw"),
        "pci_bus_id": d.get("pci_bus_id"), "architecture": d.get("architecture"),
        "utilization": util,
        "energy_counter": bool(energy) if d["kind"] == "gpu" else False,
        "power": power if d["kind"] == "gpu" else None,
        "field_values_batched": d["fields_batched"],
        "gpm": d["gpm"],
        "process_list": d["process_list"],
        "process_utilization": d["process_utilization"],
        "mig": {"enabled": bool(d.get("mig_mode")), "instance": d["kind"] == "mig",
                "parent_uuid": d["parent_uuid"] or None},
        "absent": sorted(absent),
        "healthy": not down,
    }
    if d["kind"] == "mig":
        entry["energy_note"] = "energy, power and temperature are per physical GPU; not split across MIG instances"
    return entry


def _environ_check(src: NvmlSource, pids: list[int]) -> dict:
    att = src.attribution
    if pids:
        pid = pids[0]
        what = "a GPU process"
    else:
        pid = 1
        what = "pid 1 (no GPU process was running)"
    ok, reason = att.environ_readable(pid)
    return {"pid": pid, "checked": what, "readable": ok, "reason": reason, "euid": os.geteuid(),
            "allowlist": list(att.env_keys)}


def render(d: dict) -> str:
    """Human-readable text of a probe result."""
    if not d.get("ok"):
        return f"gpuledger probe: NVML is not usable here.\n  {d.get('error')}"
    out = [f"driver {d['driver_version'] or '?'}, NVML {d['nvml_version'] or '?'}, "
           f"CUDA {d['cuda_driver_version'] or '?'}; {d['physical_gpus']} GPUs"]
    for g in d["gpus"]:
        mem = f"{g['mem_total_bytes'] / 2**30:.0f} GiB" if g.get("mem_total_bytes") else "?"
        head = "MIG instance of GPU" if g["kind"] == "mig" else "GPU"
        out.append(f"{head} {g['index']}  {g['name']}  {g['uuid']}  {mem}  PCI {g.get('pci_bus_id') or '?'}"
                   + ("" if g["healthy"] else "  [DOWN]"))
        u = g["utilization"]
        if u["method"] == "samples":
            per = u.get("sample_period_us")
            desc = f"sample buffer, period {per / 1000:.1f} ms (observed)" if per else "sample buffer"
        else:
            desc = {"rates": "utilization rates (no sample buffer)", "gpm": "GPM graphics activity",
                    "none": "none"}[u["method"]]
        out.append(f"  utilization     {desc}")
        if u.get("note"):
            out.append(f"                  {u['note']}")
        if g["kind"] == "gpu":
            out.append(f"  energy counter  {'yes' if g['energy_counter'] else 'no'}")
            out.append(f"  power           {g['power'] or 'no'}")
        else:
            out.append(f"  energy          {g['energy_note']}")
        out.append(f"  GPM             {'yes (SM active, SM occupancy, tensor active, DRAM bandwidth)' if g['gpm'] else 'no'}")
        out.append(f"  processes       {'list' if g['process_list'] else 'no list'}"
                   f"{', per-process utilization' if g['process_utilization'] else ', no per-process utilization'}")
        mig = g["mig"]
        out.append(f"  MIG             {'instance of ' + mig['parent_uuid'] if mig['instance'] else 'disabled'}")
        if g["absent"]:
            out.append(f"  not available   {', '.join(g['absent'])}")
    out.append(f"NVML calls per agent tick (mean over {d['ticks_measured']} ticks):")
    for name, c in d["call_latency_us"].items():
        out.append(f"  {name:42s} {c['calls_per_tick']:>5g} x  mean {c['mean_us']:>8.1f} us  max {c['max_us']:>8.1f} us")
    t = d["tick_latency_us"]
    out.append(f"  whole tick (all GPUs)                      mean {t['mean'] / 1000:.2f} ms  max {t['max'] / 1000:.2f} ms")
    e = d["process_environ"]
    out.append(f"process environments: {'readable' if e['readable'] else 'NOT readable'} ({e['checked']}: "
               f"{e['reason']}); tags come only from {len(e['allowlist'])} allowlisted keys")
    return "\n".join(out)
