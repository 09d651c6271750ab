"""Finance's baseline: five questions about AI spend, answered from the bill, the API spend and the telemetry.

    doc = baseline_document(store, pricing, since, until, now_ms)      # a JSON-ready dict

The questions, and what each answer rests on:

1. **What do we spend on AI, and what share of the cloud bill is it?**
   `total_cloud_cost` = the imported bill's cost in the range (every row, credits included; rows
   prorated by the overlap of their charge period with the range) + `api_cost` + the telemetry
   cost of GPU hosts no imported bill covers (on-premises, or an account not imported; priced from
   the catalog or overrides). Null without a bill.
   `gpu_instance_cost` = the bill's GPU instances (instance types with GPUs, and GPU SKUs; not
   managed AI services) + those unbilled hosts. `ai_service_cost` = the bill's other AI rows (AI and
   Machine Learning service category, known AI services, managed GPU instances such as SageMaker
   ml.*). `api_cost` = OpenAI / Anthropic spend (reported cost; priced usage only where a day has
   no reported cost). `ai_cost` = the three together; `ai_share` = ai_cost / total_cloud_cost.
2. **How much of the GPU spend do agents watch?** A bill's GPU instance is watched when an agent
   reports its instance id (HostFacts.instance_id) or the bill tags it gpuledger_host=<host_id>.
   `monitored_share` = sum over GPU instances of cost x (monitored GPU-hours / billed GPU-hours,
   at most 1), over gpu_instance_cost: an unwatched instance counts 0, an agent down half the time
   half. `unwatched_gpu_cost` and `unwatched_gpu_instances` (resource ids): GPU instances in the
   bill that no agent reports. Without a bill: the watched hosts' monitored over expected time.
3. **What does training cost against inference?** Every cost is classified as training,
   fine-tuning, inference, embedding, development or unclassified (precedence below);
   `training_cost` = training + fine-tuning, `inference_cost` = inference,
   `training_to_inference` = their ratio. `cost_per_successful_deployment` = training_cost /
   successful model deployments in the range, from a model registry (`deployments` argument);
   null with `cost_per_successful_deployment_reason` without one.
4. **How busy are the GPUs while they train?** `training_util_pct` = active GPU time / monitored GPU
   time of everything classified training or fine-tuning (a process's held time, and a
   training-tagged host's free time). Rests on telemetry only.
5. **Do inference endpoints serve, or sit idle?** `endpoint_up_hours` = GPU time (active + held)
   of processes carrying the `endpoint` tag; `endpoint_serving_hours` = the part of it in windows
   where the endpoint served: its inference server counted requests (endpoint_windows, requests > 0,
   matched by host and endpoint name) or, without request counts, the process was active at least
   `serving_min_active` (5 %) of the time it held the GPU. `endpoint_idle_share` = 1 - serving/up.

Classification precedence (first that names a known class wins; `CLASS_SYNONYMS` lists the values):
  GPU time of a process:   process tag workload, process tag phase, host tag workload, host tag phase;
  GPU time of the host's owner (idle-free, unmonitored, unattributed): host tag workload, then phase;
  bill rows (unwatched GPU instances, AI services): bill tag workload, then phase;
  billed time of a watched instance no telemetry covers: unclassified;
  API spend: embedding models or line items -> embedding, fine-tuning ones -> fine-tuning, else
  inference.
Whatever none of these names is "unclassified", shown as its own share (`unclassified_share`).

Tagging coverage: `untagged_share` gives, per key (team, project, phase), the share of GPU cost
(telemetry; a process's own tags for its time, the host's tags for the owner's) and of the bill's
positive cost (bill tags) that lacks it; `untagged_top` the costliest hosts and processes missing
one of them.

Flags per question: training_util_pct below 70, training_to_inference above 4, endpoint_idle_share
above 0.5, and GPU instances no agent reports.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from gpuledger.clock import iso_utc
from gpuledger.collector import allocation, billing, rollup
from gpuledger.collector.allocation import Periods, price_breakpoints
from gpuledger.collector.coverage import CoverageRules
from gpuledger.collector.store import Store

MS_PER_HOUR = 3_600_000.0
CLASSES = ("training", "fine-tuning", "inference", "embedding", "development")
UNCLASSIFIED = "unclassified"
CLASS_SYNONYMS = {
    "training": ("training", "train", "pretrain", "pretraining", "pre-training", "pre_training"),
    "fine-tuning": ("fine-tuning", "finetuning", "fine_tuning", "finetune", "fine-tune", "fine_tune", "sft",
                    "rlhf", "dpo"),
    "inference": ("inference", "serve", "serving", "infer", "endpoint", "online-inference", "batch-inference"),
    "embedding": ("embedding", "embeddings", "embed"),
    "development": ("development", "dev", "notebook", "experiment", "experimentation", "research", "eval",
                    "evaluation", "interactive"),
}
_SYNONYM = {v: cls for cls, vals in CLASS_SYNONYMS.items() for v in vals}
TRAINING = ("training", "fine-tuning")
UTIL_FLAG_BELOW_PCT = 70.0
RATIO_FLAG_ABOVE = 4.0
ENDPOINT_IDLE_FLAG_ABOVE = 0.5
SERVING_MIN_ACTIVE = rollup.SERVING_MIN_ACTIVE
TAG_KEYS = ("team", "project", "phase")
_SEP = "\x1f"


def classify(*values: str | None) -> str:
    """The first value naming a known class (case and spaces ignored), else unclassified."""
    for v in values:
        cls = _SYNONYM.get((v or "").strip().lower().replace(" ", "-"))
        if cls:
            return cls
    return UNCLASSIFIED


def classify_api(endpoint: str, model: str, line_item: str) -> str:
    text = f"{endpoint} {model} {line_item}".lower()
    if "embed" in text:
        return "embedding"
    if "fine-tun" in text or "fine tun" in text or "finetun" in text:
        return "fine-tuning"
    return "inference"


# ----------------------------------------------------------------------------- endpoints


@dataclass
class EndpointHours:
    up_ms: float = 0.0
    serving_ms: float = 0.0
    by_requests_ms: float = 0.0  # serving time decided by the server's request counts
    with_counts_ms: float = 0.0  # up time in windows the endpoint's request counts cover
    endpoints: dict = None

    @property
    def idle_share(self) -> float | None:
        return 1.0 - self.serving_ms / self.up_ms if self.up_ms else None


def endpoint_hours(store: Store, since: int, until: int, min_active: float = SERVING_MIN_ACTIVE) -> EndpointHours:
    """Up and serving GPU time of inference endpoints (see question 5), from the process windows of
    processes with the `endpoint` tag. A window of the process is serving when its endpoint's own window
    of request counts on the same host (the one it starts in) counted requests, or, where no such window
    covers it, when the process was active at least `min_active` of its GPU time there.

    Sealed hours come from the endpoint_use rollup (per endpoint, host and window: the attributed time,
    and the part of it in process windows active at least the default share); hours not sealed yet, the
    range's ragged ends, and every hour when `min_active` is not the default, from the raw process windows
    summed the same way. Two passes: per endpoint (up and active time), then, only on hosts whose inference
    servers reported request counts in the range, the windows those counts cover, re-decided by the counts."""
    db = store.db
    plan = allocation.read_plan(store, since, until, use_rollups=min_active == rollup.SERVING_MIN_ACTIVE)
    params = {"since": since, "until": until, "thr": float(min_active), **plan.params}
    procs = rollup.ENDPOINT_PROCS.format(db=db, where="")

    def windows(host_where: str, per_window: bool = True) -> str:
        """(host_id, endpoint, window_start_ms, t = attributed µs, s = µs of the active process windows); the
        raw part summed per process instead where the windows are not needed (window_start_ms 0 there)."""
        start = "w.window_start_ms" if per_window else "toInt64(0)"
        return f"""
            SELECT toString(host_id) AS host_id, endpoint, window_start_ms, toFloat64(attr_us) AS t,
                   toFloat64(serving_attr_us) AS s
            FROM {db}.endpoint_use FINAL WHERE {plan.rollup}{host_where}
            UNION ALL
            SELECT toString(w.host_id), p.endpoint, {start}, toFloat64(sum(w.t)),
                   toFloat64(sumIf(w.t, w.active_attr_us >= {{thr:Float64}} * w.t))
            FROM (SELECT host_id, pid, proc_start_ms, window_start_ms, active_attr_us,
                         toUInt64(active_attr_us) + held_attr_us AS t
                  FROM {db}.proc_windows FINAL
                  WHERE window_start_ms >= {{since:Int64}} AND window_start_ms < {{until:Int64}} AND {plan.raw}
                    {host_where}
                    AND (host_id, pid, proc_start_ms) IN (SELECT host_id, pid, start_ms FROM {procs})) AS w
            INNER JOIN {procs} AS p ON w.host_id = p.host_id AND w.pid = p.pid AND w.proc_start_ms = p.start_ms
            GROUP BY w.host_id, p.endpoint, {"w.window_start_ms" if per_window else "w.pid, w.proc_start_ms"}"""

    rows = store.report_rows(f"SELECT endpoint, sum(t), sum(s) FROM ({windows('', per_window=False)}) GROUP BY endpoint",
                             params)
    out = EndpointHours(endpoints={})
    ep: dict[str, list[float]] = {e: [float(up), float(act)] for e, up, act in rows}
    counted_hosts = [r[0] for r in store.report_rows(
        f"""SELECT DISTINCT toString(host_id) FROM {db}.endpoint_windows
            WHERE window_start_ms >= {{since:Int64}} - 3600000 AND window_start_ms < {{until:Int64}}""", params)]
    if counted_hosts:
        covered = "(w.window_start_ms < e.window_start_ms + e.window_ms)"
        by_req = f"({covered} AND e.requests > 0)"
        for endpoint, t_cov, act_cov, req, serving_cov in store.report_rows(
                f"""SELECT w.endpoint, sumIf(w.t, {covered}), sumIf(w.s, {covered}), sumIf(w.t, {by_req}),
                           sumIf(if({by_req}, w.t, w.s), {covered})
                    FROM ({windows(" AND host_id IN {hosts:Array(String)}")}) AS w
                    ASOF LEFT JOIN (
                        SELECT toString(host_id) AS host_id, toString(endpoint) AS endpoint, window_start_ms,
                               window_ms, requests
                        FROM {db}.endpoint_windows FINAL
                        WHERE host_id IN {{hosts:Array(String)}} AND window_start_ms >= {{since:Int64}} - 3600000
                          AND window_start_ms < {{until:Int64}}) AS e
                        ON w.host_id = e.host_id AND w.endpoint = e.endpoint AND w.window_start_ms >= e.window_start_ms
                    GROUP BY w.endpoint
                    SETTINGS join_use_nulls = 0""", {**params, "hosts": counted_hosts}):
            e = ep.setdefault(endpoint, [0.0, 0.0])
            e[1] += float(serving_cov) - float(act_cov)  # covered windows: decided by the counts instead
            out.by_requests_ms += float(req) / 1000
            out.with_counts_ms += float(t_cov) / 1000
    for endpoint, (up, serving) in ep.items():
        out.endpoints[endpoint] = {"up_hours": up / 1000 / MS_PER_HOUR, "serving_hours": serving / 1000 / MS_PER_HOUR}
        out.up_ms += up / 1000
        out.serving_ms += serving / 1000
    return out


# ----------------------------------------------------------------------------- the document


@dataclass(frozen=True)
class Deployments:
    count: int
    source: str  # e.g. "MLflow registry at http://..., 3 model versions moved to Production"


DeploymentSource = Callable[[int, int], Deployments | None]  # (since_ms, until_ms) -> deployments, or None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


LABEL_SQL = ("concat(a.host_id, '\\x1f', toString(a.pid), ':', p.command, '\\x1f', p.tags['team'], '\\x1f', "
             "p.tags['project'], '\\x1f', p.tags['phase'], '\\x1f', p.tags['workload'], '\\x1f', p.tags['endpoint'])")


def _owner_label(h) -> str:
    return _SEP.join([h.host_id, "", *(h.tags.get(k, "") for k in ("team", "project", "phase", "workload")), ""])


@dataclass
class _Label:
    host: str
    process: str  # "" for the host's owner
    team: str
    project: str
    phase: str
    workload: str
    endpoint: str


def _bill_span(store: Store, since: int, until: int) -> tuple[int | None, int | None, int, list[str]]:
    rows = store.report_rows(
        f"""SELECT min(charge_period_start_ms), max(ifNull(charge_period_end_ms, charge_period_start_ms)), count(),
                   groupUniqArray(10)(source_file)
            FROM {billing.current_sql(store, 'bill')} WHERE {billing._IN_RANGE}""", {"since": since, "until": until})
    lo, hi, n, files = rows[0]
    return (int(lo), int(hi), int(n), sorted(files)) if n else (None, None, 0, [])


def baseline_document(store: Store, pricing, since: int, until: int, now_ms: int,
                      rules: CoverageRules = CoverageRules(), basis: str = "effective",
                      deployments: DeploymentSource | None = None,
                      serving_min_active: float = SERVING_MIN_ACTIVE) -> dict:
    """The five answers for [since, until) (see the module docstring), as a JSON-ready dict."""
    priced = billing.report_pricing(store, pricing, since, until, basis)
    hosts = allocation.load_hosts(store)
    periods = Periods(since, until, 0, 0, price_breakpoints(priced, since, until))
    acc = allocation.allocate(store, priced, periods, now_ms, rules, LABEL_SQL, {}, _owner_label)
    missing: list[str] = []

    # --- telemetry, per label
    host_cost: dict[str, float] = defaultdict(float)
    host_mon_ms: dict[str, float] = defaultdict(float)
    host_exp_ms: dict[str, float] = defaultdict(float)
    classes: dict[str, float] = defaultdict(float)
    tele_training = 0.0  # training cost the telemetry sees
    class_sources: dict[str, set] = defaultdict(set)
    train_active = train_monitored = 0.0
    tagged_cost = dict.fromkeys(TAG_KEYS, 0.0)
    telemetry_cost = 0.0
    untagged: dict[tuple[str, str], dict] = {}
    unpriced_hosts: set[str] = set()
    currencies: set[str] = set()
    methods: set[str] = set()
    for lbl, tally in acc.items():
        parts = (lbl.split(_SEP) + [""] * 7)[:7]
        lab = _Label(*parts)
        h = hosts.get(lab.host) or allocation.HostRecord(lab.host)
        cost = sum(tally.cost.values()) if tally.priced else 0.0
        if not tally.priced:
            unpriced_hosts.add(lab.host)
        currencies |= tally.currency
        methods |= {m.split(" via ")[0] for m in tally.method}
        telemetry_cost += cost
        host_cost[lab.host] += cost
        host_mon_ms[lab.host] += tally.ms.monitored
        host_exp_ms[lab.host] += tally.ms.total
        if lab.process:
            cls = classify(lab.workload, lab.phase, h.tags.get("workload"), h.tags.get("phase"))
        else:
            cls = classify(lab.workload, lab.phase)
        classes[cls] += cost
        class_sources[cls].add("telemetry")
        if cls in TRAINING:
            tele_training += cost
            train_active += tally.ms.active
            train_monitored += tally.ms.monitored
        missing_tags = [k for k, v in zip(TAG_KEYS, (lab.team, lab.project, lab.phase), strict=True) if not v]
        for k in TAG_KEYS:
            if k not in missing_tags:
                tagged_cost[k] += cost
        if missing_tags and cost > 0:
            key = (lab.host, lab.process)
            u = untagged.setdefault(key, {"host": lab.host, "process": lab.process or None, "cost": 0.0,
                                          "missing": missing_tags})
            u["cost"] += cost
    if unpriced_hosts:
        missing.append(f"no price for {len(unpriced_hosts)} host(s) ({', '.join(sorted(unpriced_hosts)[:5])}): "
                       "their GPU time is counted at 0 (add a price override)")

    # --- the bill
    groups = billing.bill_groups(store, since, until, basis)
    has_bill = bool(groups)
    span_lo, span_hi, bill_rows, bill_files = _bill_span(store, since, until) if has_bill else (None, None, 0, [])
    if not has_bill:
        missing.append("no cloud bill imported for this range (gpuledger bill import): total_cloud_cost, ai_share "
                       "and unwatched GPU spend need one; GPU cost is the telemetry's at catalog or override prices")
    elif span_lo is not None and (span_lo > since + 3_600_000 or span_hi < until - 3_600_000):
        missing.append(f"the bill covers {iso_utc(max(span_lo, since))} to {iso_utc(min(span_hi, until))} of the range only")
    instances = billing.billed_instances(groups, hosts)
    watched_hosts = {i.host_id for i in instances if i.host_id}
    unwatched = [i for i in instances if not i.host_id]
    bill_total = sum(g.cost for g in groups)
    bill_gpu_cost = sum(i.cost for i in instances)
    unbilled = {h: c for h, c in host_cost.items() if h not in watched_hosts}
    unbilled_cost = float(sum(unbilled.values())) if has_bill else 0.0
    gpu_instance_cost = bill_gpu_cost + unbilled_cost if has_bill else telemetry_cost
    no_id = sorted(h for h in unbilled if has_bill and not (hosts.get(h) and hosts[h].instance_id)
                   and (hosts.get(h) and hosts[h].provider in ("aws", "gcp", "azure")))
    if no_id and unwatched:
        missing.append(f"{len(no_id)} cloud host(s) report no instance id ({', '.join(no_id[:5])}): they cannot be "
                       "matched to the bill, so their cost counts as unbilled and their instances as unwatched (perhaps "
                       "twice); set agent.instance_id or let the agent reach the metadata service")
    ai_service_cost = sum(g.cost for g in groups if g.kind == "ai_service")
    currencies |= {g.currency for g in groups if g.currency}

    # --- API spend
    api = billing.api_spend(store, since, until)
    api_cost = sum(g.cost for g in api)
    currencies |= {g.currency.upper() for g in api if g.currency}
    if not api:
        missing.append("no AI API spend imported for this range (gpuledger api-spend import)")

    total = bill_total + api_cost + unbilled_cost if has_bill else None
    ai_cost = gpu_instance_cost + ai_service_cost + api_cost
    ai_share = _div(ai_cost, total) if total is not None and total > 0 else None
    if total is not None and total <= 0:
        missing.append(f"the total is not positive ({total:,.2f}: credits exceed the charges of the range): no AI share")
    elif ai_share is not None and ai_share > 1:
        missing.append("AI cost exceeds the total: credits or refunds the bill does not tie to AI resources lower the "
                       "total below it")

    # --- classification of what the telemetry does not cover
    for inst in instances:
        if inst.host_id:
            rest = inst.cost - host_cost.get(inst.host_id, 0.0)
            if rest > 1e-9 * max(1.0, inst.cost):
                classes[UNCLASSIFIED] += rest
                class_sources[UNCLASSIFIED].add("billed time of watched instances no telemetry covers")
        else:
            for g in inst.groups:
                cls = classify(g.workload, g.phase)
                classes[cls] += g.cost
                class_sources[cls].add("bill tags")
    for g in groups:
        if g.kind == "ai_service":
            cls = classify(g.workload, g.phase)
            classes[cls] += g.cost
            class_sources[cls].add("bill tags")
    for g in api:
        cls = classify_api(g.endpoint, g.model, g.line_item)
        classes[cls] += g.cost
        class_sources[cls].add("API spend")
    classified_total = sum(classes.values())
    training_cost = sum(classes.get(c, 0.0) for c in TRAINING)
    inference_cost = classes.get("inference", 0.0)
    ratio = _div(training_cost, inference_cost)
    unclassified_share = _div(classes.get(UNCLASSIFIED, 0.0), classified_total)
    training_util = 100.0 * train_active / train_monitored if train_monitored else None

    # --- monitored share
    covered_cost = 0.0
    matched = []
    for inst in instances:
        if not inst.host_id:
            continue
        h = hosts.get(inst.host_id)
        gpus = inst.gpu_count or (h.gpu_count if h else 0)
        billed_gpu_ms = inst.hours * gpus * MS_PER_HOUR
        cov = min(1.0, host_mon_ms.get(inst.host_id, 0.0) / billed_gpu_ms) if billed_gpu_ms > 0 else 0.0
        covered_cost += inst.cost * cov
        matched.append((inst, gpus, cov))
    for h, c in (unbilled.items() if has_bill else host_cost.items()):
        exp = host_exp_ms.get(h, 0.0)
        covered_cost += c * (host_mon_ms.get(h, 0.0) / exp if exp else 0.0)
    monitored_share = _div(covered_cost, gpu_instance_cost)
    unwatched_cost = sum(i.cost for i in unwatched) if has_bill else None

    # --- endpoints
    ep = endpoint_hours(store, since, until, serving_min_active)

    # --- deployments
    dep = deployments(since, until) if deployments is not None else None
    if dep is not None and dep.count > 0:
        per_deployment, dep_reason = training_cost / dep.count, None
    elif dep is not None:
        per_deployment, dep_reason = None, f"no successful deployment in the range ({dep.source})"
    else:
        per_deployment, dep_reason = None, ("no model registry connected: cost per successful deployment needs the "
                                            "count of model versions deployed in the range (MLflow registry)")

    # --- tagging
    bill_positive = sum(g.positive_cost for g in groups)
    bill_tagged = {k: sum(g.positive_cost for g in groups if getattr(g, k)) for k in TAG_KEYS}
    untagged_share = {
        "gpu_cost": {k: (1.0 - tagged_cost[k] / telemetry_cost) if telemetry_cost else None for k in TAG_KEYS},
        "bill_cost": {k: (1.0 - bill_tagged[k] / bill_positive) if bill_positive else None for k in TAG_KEYS},
    }
    untagged_top = sorted(untagged.values(), key=lambda u: (-u["cost"], u["host"], u["process"] or ""))[:10]

    currency = ",".join(sorted(currencies)) or "USD"
    if len(currencies) > 1:
        missing.append(f"several currencies ({currency}): amounts are added as they are, not converted")
    bill_note = (f"{bill_rows:,} bill rows from {', '.join(bill_files)}" if has_bill else "no bill")
    api_note = f"{len(api)} API spend groups ({', '.join(sorted({g.vendor for g in api}))})" if api else "no API spend"
    price_note = "; ".join(sorted(methods)) or "no GPU telemetry"

    def flag(cond: bool, text: str) -> list[str]:
        return [text] if cond else []

    q = [
        {"id": "ai_spend", "question": "What do we spend on AI, and what share of the cloud bill is it?",
         "answer": {"total_cloud_cost": total, "ai_cost": ai_cost, "ai_share": ai_share,
                    "gpu_instance_cost": gpu_instance_cost, "ai_service_cost": ai_service_cost,
                    "api_cost": api_cost, "unbilled_gpu_cost": unbilled_cost},
         "method": f"bill rows in the range ({basis} cost, prorated by charge period), sorted into GPU instances, AI "
                   "services and the rest; plus API spend; plus the telemetry cost of GPU hosts no bill covers",
         "rests_on": [bill_note, api_note, f"telemetry of {len(host_cost)} host(s) ({price_note})"],
         "covers": (f"the bill's rows from {iso_utc(span_lo)} to {iso_utc(span_hi)}" if has_bill and span_lo is not None
                    else "telemetry and API spend only: the cloud total is unknown"),
         "coverage_share": 1.0 if has_bill else None, "flags": []},
        {"id": "gpu_monitoring", "question": "How much of the GPU spend do agents watch?",
         "answer": {"monitored_share": monitored_share, "unwatched_gpu_cost": unwatched_cost,
                    "unwatched_gpu_instances": [i.resource_id for i in unwatched] if has_bill else None},
         "method": "GPU instances of the bill matched to agents by instance id (or a gpuledger_host tag); each "
                   "weighted by its cost and its monitored / billed GPU-hours",
         "rests_on": [bill_note, f"{len(watched_hosts)} of {len(instances)} billed GPU instance(s) matched to agents"],
         "covers": "the GPU instances in the bill" if has_bill else "watched hosts only (no bill: unwatched ones "
                                                                    "cannot be known)",
         "coverage_share": monitored_share,
         "flags": flag(bool(unwatched), f"{len(unwatched)} GPU instance(s) in the bill report to no agent "
                                        f"({(unwatched_cost or 0):,.2f} {currency})")},
        {"id": "training_vs_inference", "question": "What does training cost against inference?",
         "answer": {"training_cost": training_cost, "inference_cost": inference_cost,
                    "training_to_inference": ratio, "cost_per_successful_deployment": per_deployment,
                    "cost_per_successful_deployment_reason": dep_reason},
         "method": "every cost classified by tags (process workload, phase; host workload, phase; bill workload, "
                   "phase; API spend by model); training = training + fine-tuning",
         "rests_on": sorted({s for v in class_sources.values() for s in v}),
         "covers": f"{(1 - (unclassified_share or 0)):.1%} of AI cost classified; the rest is unclassified",
         "coverage_share": 1.0 - unclassified_share if unclassified_share is not None else None,
         "flags": flag(ratio is not None and ratio > RATIO_FLAG_ABOVE,
                       f"training costs {ratio or 0:.1f}x inference (above {RATIO_FLAG_ABOVE:g})")},
        {"id": "training_utilization", "question": "How busy are the GPUs while they train?",
         "answer": {"training_util_pct": training_util},
         "method": "active GPU time / monitored GPU time of everything classified training or fine-tuning",
         "rests_on": [f"telemetry: {train_monitored / MS_PER_HOUR:,.1f} monitored training GPU-hours"],
         "covers": "training on watched GPUs; training on unwatched instances or services has no utilization",
         "coverage_share": _div(tele_training, training_cost),
         "flags": flag(training_util is not None and training_util < UTIL_FLAG_BELOW_PCT,
                       f"training GPUs {training_util or 0:.0f} % active (below {UTIL_FLAG_BELOW_PCT:g} %)")},
        {"id": "endpoint_idle", "question": "Do inference endpoints serve, or hold GPUs idle?",
         "answer": {"endpoint_up_hours": ep.up_ms / MS_PER_HOUR, "endpoint_serving_hours": ep.serving_ms / MS_PER_HOUR,
                    "endpoint_idle_share": ep.idle_share},
         "method": "GPU time of processes with the endpoint tag (up); serving where the inference server counted "
                   f"requests in the window, else where the process was active at least {serving_min_active:.0%} "
                   "of its GPU time",
         "rests_on": [f"{len(ep.endpoints)} endpoint(s) in the telemetry",
                      f"{ep.with_counts_ms / MS_PER_HOUR:,.1f} of {ep.up_ms / MS_PER_HOUR:,.1f} up GPU-hours with the "
                      "server's request counts"],
         "covers": "endpoints on watched GPUs that carry the endpoint tag",
         "coverage_share": _div(ep.with_counts_ms, ep.up_ms),
         "flags": flag(ep.idle_share is not None and ep.idle_share > ENDPOINT_IDLE_FLAG_ABOVE,
                       f"endpoints idle {ep.idle_share or 0:.0%} of the GPU time they hold (above "
                       f"{ENDPOINT_IDLE_FLAG_ABOVE:.0%})")},
    ]
    doc = {"since": iso_utc(since), "until": iso_utc(until), "cost_basis": basis, "currency": currency}
    for question in q:
        doc.update(question["answer"])
    doc.update({
        "questions": q,
        "flags": [f for question in q for f in question["flags"]],
        "missing": missing,
        "workload_costs": {c: classes.get(c, 0.0) for c in (*CLASSES, UNCLASSIFIED)},
        "unclassified_share": unclassified_share,
        "untagged_share": untagged_share,
        "untagged_top": untagged_top,
        "instances": [{"resource_id": inst.resource_id, "host": inst.host_id or None,
                       "instance_type": inst.instance_type, "gpus": gpus, "cost": inst.cost,
                       "billed_gpu_hours": inst.hours * gpus,
                       "monitored_gpu_hours": host_mon_ms.get(inst.host_id, 0.0) / MS_PER_HOUR,
                       "coverage": cov, "price_per_instance_hour": inst.price_per_instance_hour}
                      for inst, gpus, cov in matched]
        + [{"resource_id": inst.resource_id, "host": None, "instance_type": inst.instance_type,
            "gpus": inst.gpu_count, "cost": inst.cost, "billed_gpu_hours": inst.billed_gpu_hours,
            "monitored_gpu_hours": 0.0, "coverage": 0.0, "price_per_instance_hour": inst.price_per_instance_hour}
           for inst in unwatched],
        "endpoints": ep.endpoints,
    })
    return doc


def baseline_table(store: Store, pricing, since: int, until: int, filters: dict, now_ms: int,
                   rules: CoverageRules = CoverageRules(), deployments: DeploymentSource | None = None) -> pa.Table:
    """The report over the Query service: one row, the document as JSON (filters: basis, serving_min_active)."""
    from gpuledger.collector.reports import ReportError

    basis = filters.get("basis", "effective") or "effective"
    if basis not in ("effective", "billed"):
        raise ReportError(f"basis: {basis!r} is not effective or billed")
    try:
        thr = float(filters.get("serving_min_active", SERVING_MIN_ACTIVE))
    except ValueError as e:
        raise ReportError(f"serving_min_active: {filters['serving_min_active']!r} is not a number") from e
    if not 0 <= thr <= 1:
        raise ReportError("serving_min_active: must be within [0, 1]")
    doc = baseline_document(store, pricing, since, until, now_ms, rules, basis, deployments, thr)
    return pa.table({"document": [json.dumps(doc)], "currency": [doc["currency"]]})


# ----------------------------------------------------------------------------- text


def _money(v, currency: str) -> str:
    return "-" if v is None else f"{v:,.2f} {currency}"


def _fmt(key: str, v, currency: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "none"
    if key.endswith(("_share",)):
        return f"{v:.1%}"
    if key.endswith("_pct"):
        return f"{v:.1f} %"
    if key.endswith("_hours"):
        return f"{v:,.1f} GPU-h"
    if key == "training_to_inference":
        return f"{v:.2f}"
    if isinstance(v, (int, float)):
        return _money(v, currency)
    return str(v)


def render_text(doc: dict) -> str:
    """The baseline as text for a terminal."""
    cur = doc["currency"]
    out = [f"Finance baseline {doc['since']} to {doc['until']} ({doc['cost_basis']} cost, {cur})", ""]
    for i, q in enumerate(doc["questions"], 1):
        out.append(f"{i}. {q['question']}")
        for k, v in q["answer"].items():
            if v is None and k.endswith("_reason"):
                continue
            out.append(f"     {k:<38} {_fmt(k, v, cur)}")
        out.append(f"   how:      {q['method']}")
        out.append(f"   rests on: {'; '.join(q['rests_on'])}")
        out.append(f"   covers:   {q['covers']}")
        for f in q["flags"]:
            out.append(f"   FLAG:     {f}")
        out.append("")
    wl = doc["workload_costs"]
    out.append("Cost by workload: " + ", ".join(f"{k} {_money(v, cur)}" for k, v in wl.items()))
    us = doc["untagged_share"]
    out.append("Untagged share of GPU cost: " + ", ".join(f"{k} {_fmt('x_share', v, cur)}"
                                                        for k, v in us["gpu_cost"].items())
               + "; of bill cost: " + ", ".join(f"{k} {_fmt('x_share', v, cur)}" for k, v in us["bill_cost"].items()))
    for u in doc["untagged_top"][:5]:
        out.append(f"  untagged: {u['host']} {u['process'] or '(host owner)'}: {_money(u['cost'], cur)} "
                   f"(no {', '.join(u['missing'])})")
    for m in doc["missing"]:
        out.append(f"missing: {m}")
    return "\n".join(out)
