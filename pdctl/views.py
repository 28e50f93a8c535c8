"""Pure rendering: data in, rich renderables out. The CLI prints them; tests read their text."""

from __future__ import annotations

import shlex

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from pdctl.engines.runtime import InstallPlan
from pdctl.gpus import GpuInventory
from pdctl.launchers import launcher_class
from pdctl.lifecycle import InstanceFailure
from pdctl.placement import describe_needs
from pdctl.plan import Plan, PlannedInstance
from pdctl.profile import ClusterProfile
from pdctl.router.client import RouteResult
from pdctl.safetext import cell, printable
from pdctl.state import ClusterState


def _figure(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def gpu_table(inventory: GpuInventory) -> Table | Text:
    if not inventory.gpus:
        return cell(f"No GPU: {inventory.unavailable_reason}. Instances run on the CPU.", style="yellow")
    # 80 columns wide: no vertical rules, and the UUIDs (40 characters) only in --json.
    table = Table(title=cell(f"GPUs (driver {inventory.driver_version})"), title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("#", "name", "memory GiB used/total", "util", "temp", "power", "processes"):
        table.add_column(column, overflow="fold")
    for gpu in inventory.gpus:
        processes = ", ".join(f"{p.pid} {p.name or '?'} {_figure(p.used_memory_mib, ' MiB')}" for p in gpu.processes)
        table.add_row(
            str(gpu.index),
            cell(gpu.name),
            f"{gpu.memory_used_mib / 1024:.1f} / {gpu.memory_total_mib / 1024:.1f}",
            _figure(gpu.utilization_percent, "%"),
            _figure(gpu.temperature_c, "°C"),
            _figure(gpu.power_w, " W"),
            cell(processes or "-"),
        )
    return table


def profile_summary(profile: ClusterProfile, source: str) -> Text:
    instances = profile.resolved_instances()
    counts = {
        role: sum(1 for i in instances if i.instance_type.value == role)
        for role in ("PREFILLING", "DECODING", "HYBRID")
    }
    parts = [f"{n} {role.lower()}" for role, n in counts.items() if n]
    scenario = f", scenario {profile.scenario}" if profile.scenario else ""
    return cell(
        f"{source}: profile {profile.name!r} is valid{scenario}: {', '.join(parts)}; "
        f"routing {profile.pd.routing_policy if profile.pd.enabled else 'off (PD disabled)'}; "
        f"router {profile.router.host}:{profile.router.port}",
        style="green",
    )


def _devices(instance: PlannedInstance) -> str:
    if instance.needs:
        where = f"node {instance.node}" if instance.node else "any node"
        cores = f", cores {','.join(str(c) for c in instance.cpu_cores)}" if instance.cpu_cores else ""
        return f"{where} with {describe_needs(instance.needs)}{cores}"
    if instance.gpus:
        return ", ".join(f"GPU {gpu.index}" for gpu in instance.gpus)
    if instance.cpu_cores:
        return f"CPU cores {','.join(str(c) for c in instance.cpu_cores)}"
    return "-" if instance.launch else "remote (attached)"


def shell_lines(argv: list[str]) -> str:
    """A command line to read and to paste: one flag and its value per line."""
    if not argv:
        return ""
    lines: list[list[str]] = [[]]
    for arg in argv:
        if arg.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(shlex.quote(arg))
    return " \\\n    ".join(" ".join(line) for line in lines)


def install_plan_view(plan: InstallPlan) -> Text:
    """`pdctl engine install --dry-run`: the build and why, where, the pinned packages and each command."""
    text = Text(f"{plan.build} build ({plan.reason})\n", style="bold")
    text.append(f"into {plan.target} (python {plan.python})\n")
    text.append(f"pinned: {' '.join(plan.packages)}\n")
    if plan.installed is not None:
        text.append(f"already installed (vLLM {plan.installed.vllm_version}): nothing to do\n", style="green")
    else:
        for number, step in enumerate(plan.steps, 1):
            text.append(f"{number}. {step.title}\n   {shell_lines(step.argv)}\n")
        text.append("then it checks:\n" + "".join(f"   - {check}\n" for check in plan.checks))
    for note in plan.notes:
        text.append(f"note: {note}\n", style="yellow")
    text.append("dry run: nothing was installed")
    return text


def plan_view(plan: Plan) -> Group:
    parts: list[Text] = [
        cell(
            f"cluster {plan.cluster}: {len(plan.launched)} of {len(plan.instances)} instances launched "
            f"{launcher_class(plan.launcher.kind).where(plan)} on {plan.device}; engine {plan.engine}; "
            f"model {plan.model_path} served as {plan.served_model_name}; "
            f"router http://{plan.router.host}:{plan.router.port}",
            style="bold",
        )
    ]
    for instance in plan.instances:
        line = f"{instance.id}  {instance.role.value}  {_devices(instance)}  {instance.host}:{instance.port}"
        parts.append(Text("\n" + printable(line), style="bold cyan"))
        if not instance.launch:
            parts.append(Text("  not launched: attached to the engine at this address"))
            continue
        env = "".join(f"  {key}={shlex.quote(value)}\n" for key, value in sorted(instance.env.items()))
        parts.append(Text(printable(env + "  " + shell_lines(instance.argv), multiline=True)))
    notes = "\n".join(f"note: {note}" for note in plan.notes)
    parts.append(Text("\n" + printable(notes, multiline=True), style="yellow"))
    return Group(*parts)


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


_PHASE_STYLE = {
    "healthy": "green",
    "attached": "green",
    "failed": "red",
    "dead": "red",
    "unreachable": "red",
    "backoff": "yellow",
    "unhealthy": "yellow",
    "blocked": "red",
}


def progress_table(state: ClusterState, plan: Plan, now: float) -> Table:
    """One line per instance while `up` waits: phase and time since launch."""
    table = Table(title=f"cluster {state.cluster}: {state.phase.value}", title_justify="left")
    for column in ("instance", "role", "address", "phase", "elapsed"):
        table.add_column(column)
    for planned in plan.instances:
        status = state.instances.get(planned.id)
        phase = status.phase.value if status else "pending"
        since = status.healthy_at if status and status.healthy_at else now
        elapsed = since - status.started_at if status and status.started_at else None
        table.add_row(
            planned.id,
            planned.role.value,
            cell(f"{planned.host}:{planned.port}"),
            Text(phase, style=_PHASE_STYLE.get(phase, "cyan")),
            _elapsed(elapsed),
        )
    return table


def failure_report(failures: list[InstanceFailure]) -> Group:
    parts: list[Text] = []
    for failure in failures:
        code = "-" if failure.exit_code is None else str(failure.exit_code)
        parts.append(
            cell(
                f"{failure.id} failed: {failure.message or 'unknown'} (exit code {code}); log {failure.log_path}",
                style="bold red",
            )
        )
        lines = "\n".join(f"  | {printable(line)}" for line in failure.last_lines)
        parts.append(Text(lines or "  (empty log)", style="dim"))
    return Group(*parts)


def decision_view(decision: dict) -> Group:
    """What the router decided for one request, and the figures it compared."""
    figures = ", ".join(f"{key} {value}" for key, value in decision["figures"].items())
    lines = [
        cell(f"phase {decision['phase']}: {decision['reason']}", style="bold"),
        cell(f"  input tokens {decision['input_tokens']}, expected output {decision['expected_output_tokens']}"),
        cell(f"  figures: {figures}", style="dim"),
    ]
    for hop in ("prefill", "decode"):
        chosen = decision.get(hop)
        if chosen:
            scores = ", ".join(f"{i} {s}" for i, s in chosen["scores"].items()) or "only candidate"
            lines.append(cell(f"  {hop}: {chosen['instance']} ({chosen['url']}); scores {scores}"))
    return Group(*lines)


def answer_text(text: str) -> Text:
    """A piece of the model's answer as it streams: its lines kept, anything a terminal would obey escaped."""
    return Text(printable(text, multiline=True))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def route_result_view(result: RouteResult) -> Text:
    """The answer's timing; n/a where the stream cannot tell (TPOT of one token, or of all tokens in one event)."""

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1000:.0f} ms"

    via = " -> ".join(x for x in (result.prefill, result.decode) if x)
    served = f"{result.phase} via {via}" if result.phase else "answered"
    counts = f"{_count(result.output_tokens, 'token')} in {_count(result.token_events, 'event')}"
    return cell(
        f"{result.request_id or 'request'}: {served}; {counts}; "
        f"TTFT {ms(result.ttft_s)}, TPOT {ms(result.tpot_s)}, total {ms(result.total_s)}",
        style="green",
    )
