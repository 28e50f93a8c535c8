"""`pdctl calibrate` on stored real runs (the fit and its own held-out check, no vLLM), profiles by name from the
user's hardware directory, the machine every profile records, and the one line a profile measured on another
machine prints. The real measurement runs in tests/test_e2e_calibrate.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pdctl.gpus import StaticGpuSource
from pdctl.perfmodel.calibrate import check_layers, machine_of, with_collectives
from pdctl.perfmodel.hardware import HardwareProfile, Link, Machine, get_hardware, known_hardware
from pdctl.perfmodel.machine import ISA_FLAGS, cpu_of, differences, machine_note, this_cpu
from pdctl.simulate import cpufit
from pdctl.simulate.calibration import another_fits
from pdctl.simulate.cpumeasure import write_runs
from tests.conftest import ROOT, fake_gpu

RESULTS = ROOT / "benchmarks" / "results"
SIM_PROFILE = """name: calsim
model: {path: "builtin:tiny-llama"}
engine: {kind: sim, sim: {hardware: HARDWARE}}
device: cpu
pd: {enabled: false, decoding_min_instances: 1, enable_dynamic_scaling: false}
decode: {tensor_parallel_size: 1, max_parallel_requests: 16}
"""


def pdctl(*args: str, data_home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_DATA_HOME": str(data_home)}
    return subprocess.run([sys.executable, "-m", "pdctl", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def stored() -> dict[str, Any]:
    return json.loads(cpufit.RUNS_PATH.read_text())


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, stored: dict[str, Any]) -> tuple[Path, Path]:
    """`pdctl calibrate stored8 --from-runs` on the first eight stored measurements (as many as the full mode
    takes), recorded as measured on a machine named in the runs: (the data home, the command's stdout file)."""
    home = tmp_path_factory.mktemp("data")
    runs = home / "runs.json"
    machine = {"cpu": "Stored CPU 1", "cpu_flags": ["avx2", "avx512f"], "cores": 2, "vllm": "0.32.0"}
    write_runs(runs, {"machine": machine, "measurements": stored["measurements"][:8]})
    done = pdctl("calibrate", "stored8", "--from-runs", str(runs), data_home=home)
    assert done.returncode == 0, done.stderr
    (home / "stdout.txt").write_text(done.stdout)
    return home, home / "stdout.txt"


def test_calibrating_from_eight_stored_measurements_meets_the_bar_on_its_held_out_runs(
    calibrated: tuple[Path, Path],
) -> None:
    """The issue's target for the full mode: at least 42 of the 48 median figures of the validation runs (not in
    the fit) within 10 %, median error under 5 %; the profile names the machine its runs record."""
    home, stdout = calibrated
    profile = HardwareProfile.model_validate_json((home / "pdctl" / "hardware" / "stored8.json").read_text())
    assert profile.name == "stored8" and profile.fidelity is not None
    assert len(profile.fidelity.figures) == len(cpufit.VALIDATION) * len(cpufit.HEADLINE) == 48
    assert profile.fidelity.within() >= 42 and profile.fidelity.median_error() < 0.05
    assert len(profile.fidelity.real_against_real) == 48  # odd measurements against even ones
    assert profile.measured.machine is not None and profile.measured.machine.cpu == "Stored CPU 1"
    assert profile.measured.machine.vllm == "0.32.0"
    text = stdout.read_text()
    assert "| qa-c12 |" in text and profile.fidelity.summary() in text
    assert "use it with --hardware stored8 or engine.sim.hardware: stored8" in text


def quick_shaped(measurement: dict[str, Any]) -> dict[str, Any]:
    """A stored measurement as `--quick` runs it: its concurrency-1 validation runs cut to their first requests
    (run one after another, so the run lasts as long as they do)."""
    validation = {}
    for name, run in measurement["validation"].items():
        kept = run["requests"][: len(cpufit.QUICK_VALIDATION[name][0])]
        duration = sum(r["e2e"] for r in kept) if run["max_concurrency"] == 1 else run["duration"]
        validation[name] = run | {"requests": kept, "duration": duration}
    return measurement | {"validation": validation}


def test_two_quick_measurements_predict_their_runs_about_as_well_as_they_predict_each_other(
    stored: dict[str, Any], tmp_path: Path
) -> None:
    """`--quick` on stored runs: two measurements cut as it cuts them. The check the end-to-end test makes of a
    real quick run, on every other pair of the stored measurements (all eight pairs hold; four keep the test
    short): the model's figures against both together, beside the first measurement against the second."""
    for first in range(0, 16, 4):
        runs = tmp_path / f"quick{first}.json"
        pair = [quick_shaped(m) for m in stored["measurements"][first : first + 2]]
        write_runs(runs, {"validation": "quick", "measurements": pair})
        done = pdctl("calibrate", f"q{first}", "--from-runs", str(runs), data_home=tmp_path)
        assert done.returncode == 0, done.stderr
        profile = get_stored(tmp_path, f"q{first}")
        assert profile.description.endswith("fitted by pdctl calibrate --quick")  # the runs say which validation
        fidelity = profile.fidelity
        assert fidelity is not None and sorted({f.run for f in fidelity.figures}) == sorted(cpufit.QUICK_VALIDATION)
        floor = fidelity.floor()
        assert floor is not None and len(floor.figures) == 48
        assert fidelity.within() >= floor.within() - 4, (first, fidelity.summary())
        assert fidelity.median_error() <= floor.median_error() + 0.02, (first, fidelity.summary())


def test_quick_takes_a_second_measurement_only_where_it_fits_the_budget() -> None:
    assert another_fits(80.0, 1) and not another_fits(170.0, 1) and not another_fits(140.0, 1, budget_s=200.0)


def test_a_calibrated_profile_is_used_by_name_and_simulate_carries_its_fidelity(
    calibrated: tuple[Path, Path], tmp_path: Path
) -> None:
    home, _ = calibrated
    profile_path = tmp_path / "calsim.yaml"
    profile_path.write_text(SIM_PROFILE.replace("HARDWARE", "stored8"))
    done = pdctl("simulate", str(profile_path), "--num-prompts", "8", "--input-len", "64", "--output-len", "8",
                 "--json", data_home=home)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    fidelity = get_stored(home, "stored8").fidelity
    assert fidelity is not None
    assert result["hardware"] == "stored8" and result["hardware_fidelity"]["within"] == fidelity.within()
    assert result["hardware_fidelity"]["summary"].startswith(f"stored8: {fidelity.summary()}; measured on Stored CPU 1")
    # Another CPU than this one recorded: the one line, on stderr, saying how to measure this machine.
    lines = [line for line in done.stderr.splitlines() if "was measured on" in line]
    assert len(lines) == 1 and "Stored CPU 1" in lines[0] and "pdctl calibrate NAME" in lines[0]
    # The table prints the same under it.
    table = pdctl("simulate", str(profile_path), "--num-prompts", "8", "--input-len", "64", "--output-len", "8",
                  data_home=home)  # fmt: skip
    assert "hardware stored8: " in table.stdout and "median |error|" in table.stdout


def get_stored(home: Path, name: str) -> HardwareProfile:
    return HardwareProfile.model_validate_json((home / "pdctl" / "hardware" / f"{name}.json").read_text())


def test_a_profile_recorded_on_this_machine_prints_no_line_and_is_found_by_the_sim_engine(tmp_path: Path) -> None:
    """By name from $XDG_DATA_HOME/pdctl/hardware: `pdctl simulate --hardware NAME`, and the sim engine's own
    check of its arguments (the process `engine.sim.hardware: NAME` starts)."""
    here = this_cpu().model_copy(update={"source": "test"})
    shipped = get_hardware("cpu-local")
    mine = shipped.model_copy(
        update={"name": "mine", "measured": shipped.measured.model_copy(update={"machine": here})}
    )
    (tmp_path / "pdctl" / "hardware").mkdir(parents=True)
    (tmp_path / "pdctl" / "hardware" / "mine.json").write_text(mine.model_dump_json())
    profile_path = tmp_path / "calsim.yaml"
    profile_path.write_text(SIM_PROFILE.replace("HARDWARE", "cpu-local"))
    done = pdctl("simulate", str(profile_path), "--hardware", "mine", "--num-prompts", "4", "--json",
                 data_home=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["hardware"] == "mine" and "was measured on" not in done.stderr
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    check = subprocess.run([sys.executable, "-c", "from pdctl.engines.sim.cli import parse_args; "
                            "print(parse_args(['--served-model-name', 'builtin:tiny-llama', '--hardware', 'mine']))"],
                           capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert check.returncode == 0 and "hardware='mine'" in check.stdout, check.stderr


def test_known_hardware_lists_the_users_profiles_after_the_shipped_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    (tmp_path / "pdctl" / "hardware").mkdir(parents=True)
    (tmp_path / "pdctl" / "hardware" / "a-box.json").write_text(get_hardware("cpu-local").model_dump_json())
    (tmp_path / "pdctl" / "hardware" / "cpu-local.json").write_text("{}")  # shadowed by the shipped one
    assert known_hardware() == ["cpu-local", "h100-sxm", "a-box"]
    assert get_hardware("cpu-local").fidelity is not None  # the shipped one: the user's "{}" would not load
    assert get_hardware("a-box").name == "cpu-local"  # a file's own name field is kept


def test_a_broken_profile_file_is_named_and_an_unknown_name_says_how_to_make_one(tmp_path: Path) -> None:
    (tmp_path / "pdctl" / "hardware").mkdir(parents=True)
    (tmp_path / "pdctl" / "hardware" / "broken.json").write_text('{"name": "broken"}')
    profile_path = tmp_path / "calsim.yaml"
    profile_path.write_text(SIM_PROFILE.replace("HARDWARE", "broken"))
    broken = pdctl("simulate", str(profile_path), "--num-prompts", "4", data_home=tmp_path)
    assert broken.returncode == 2 and "broken.json is not a hardware profile at description" in broken.stderr
    unknown = pdctl("simulate", str(profile_path), "--hardware", "nowhere", data_home=tmp_path)
    assert unknown.returncode == 2 and "unknown hardware profile 'nowhere'" in unknown.stderr
    assert "`pdctl calibrate NAME` measures this machine" in unknown.stderr
    assert "Traceback" not in broken.stderr + unknown.stderr


def test_calibrate_refuses_a_shipped_name_a_bad_name_and_a_bad_device_before_measuring(tmp_path: Path) -> None:
    shipped = pdctl("calibrate", "cpu-local", "--quick", data_home=tmp_path)
    assert shipped.returncode == 2 and "'cpu-local' is a shipped hardware profile" in shipped.stderr
    bad = pdctl("calibrate", "../x", data_home=tmp_path)
    assert bad.returncode == 2 and "letters, digits" in bad.stderr
    device = pdctl("calibrate", "x", "--device", "tpu", data_home=tmp_path)
    assert device.returncode == 2 and "--device 'tpu'" in device.stderr
    empty = tmp_path / "empty.json"
    empty.write_text('{"measurements": []}')
    no_runs = pdctl("calibrate", "x", "--from-runs", str(empty), data_home=tmp_path)
    assert no_runs.returncode == 2 and "no measurements" in no_runs.stderr
    assert not (tmp_path / "pdctl" / "hardware").exists()


# -- the machine ---------------------------------------------------------------------------------------------

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 fma avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8 hypervisor

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 fma avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8 hypervisor
"""
EPYC = Machine(cpu="AMD EPYC", cpu_flags=["avx2", "avx512f", "avx512_bf16", "avx512_vnni"], cores=2)


def test_the_cpu_and_its_instruction_sets_are_read_from_cpuinfo() -> None:
    model, flags = cpu_of(CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"]
    assert cpu_of("") == (None, None)
    here = this_cpu()
    assert here.cores == len(os.sched_getaffinity(0)) and set(here.cpu_flags or []) <= set(ISA_FLAGS)


def test_a_cpu_profile_differs_by_model_or_instruction_sets_and_a_gpu_profile_by_gpu() -> None:
    model, flags = cpu_of(CPUINFO)
    xeon = Machine(cpu=model, cpu_flags=flags, cores=2)
    assert differences(EPYC, EPYC.model_copy(update={"cores": 16})) == []
    assert differences(EPYC, xeon) == ["this one is Intel(R) Xeon(R) Platinum 8480+",
                                       "this one has amx_bf16, amx_int8, amx_tile"]  # fmt: skip
    assert differences(EPYC, EPYC.model_copy(update={"cpu_flags": ["avx2"]})) == [
        "this one lacks avx512f, avx512_bf16, avx512_vnni"
    ]
    # What one side did not record is not compared; a CPU not recorded at all cannot be vouched for.
    assert differences(EPYC.model_copy(update={"cpu": None}), xeon) == ["this one has amx_bf16, amx_int8, amx_tile"]
    assert differences(EPYC, xeon.model_copy(update={"cpu": None, "cpu_flags": None})) == []
    unrecorded = EPYC.model_copy(update={"cpu": None, "cpu_flags": None})
    assert differences(unrecorded, EPYC) == ["this one is AMD EPYC"]
    h100 = Machine(gpu="NVIDIA H100 80GB HBM3", gpus=1)
    assert differences(h100, EPYC) == []  # no GPU here: sizing GPUs one has not got is the simulator's use
    assert differences(h100, xeon.model_copy(update={"gpu": "NVIDIA H200"})) == ["this one has NVIDIA H200"]
    assert differences(h100, xeon.model_copy(update={"gpu": "NVIDIA H100 80GB HBM3"})) == []


def test_the_note_names_the_profile_both_machines_and_the_way_out() -> None:
    shipped = get_hardware("h100-sxm")
    h200 = fake_gpu(0).model_copy(update={"name": "NVIDIA H200"})
    note = machine_note(shipped, StaticGpuSource([h200], driver_version="580.159.04"))
    assert note == (
        "hardware profile h100-sxm was measured on NVIDIA H100 80GB HBM3; this one has NVIDIA H200: its timings may "
        "not hold here. `pdctl calibrate NAME` measures this machine (then --hardware NAME)"
    )
    assert machine_note(shipped, StaticGpuSource([fake_gpu(0)])) is None  # an H100 80GB HBM3
    assert machine_note(shipped, StaticGpuSource([])) is None


def test_a_sim_cluster_on_hardware_measured_elsewhere_says_so_in_its_plan(tmp_path: Path) -> None:
    elsewhere = get_hardware("cpu-local").model_copy(update={"name": "elsewhere"})
    measured = elsewhere.measured.model_copy(update={"machine": Machine(cpu="Imaginary CPU 9000", cpu_flags=[])})
    (tmp_path / "pdctl" / "hardware").mkdir(parents=True)
    (tmp_path / "pdctl" / "hardware" / "elsewhere.json").write_text(
        elsewhere.model_copy(update={"measured": measured}).model_dump_json()
    )
    profile_path = tmp_path / "calsim.yaml"
    profile_path.write_text(SIM_PROFILE.replace("HARDWARE", "elsewhere"))
    done = pdctl("plan", str(profile_path), data_home=tmp_path)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # the table wraps long notes
    assert "hardware profile elsewhere was measured on Imaginary CPU 9000; this one is" in text


# -- the shipped profiles and the GPU fit ------------------------------------------------------------------


def test_every_shipped_profile_records_its_machine_and_its_fidelity(stored: dict[str, Any]) -> None:
    h100 = get_hardware("h100-sxm")
    assert h100.measured.machine is not None and h100.measured.machine.gpu == "NVIDIA H100 80GB HBM3"
    assert h100.measured.machine.torch == "2.11.0+cu130" and h100.measured.machine.cuda == "13.0"
    raw = json.loads((RESULTS / "h100_raw.json").read_text())
    checks = check_layers(raw["layers"], h100)
    assert h100.fidelity is not None and len(h100.fidelity.figures) == len(checks) == 44
    assert h100.fidelity.within() == sum(abs(c.error) <= 0.10 for c in checks) == 38
    assert len(h100.fidelity.real_against_real) == 44  # h100_raw_repeat.json
    cpu = get_hardware("cpu-local")
    assert cpu.measured.machine is not None and cpu.measured.machine.vllm == "0.32.0"
    assert cpu.fidelity is not None and cpu.fidelity.within() == cpufit.within(cpufit.compare_runs(stored)) == 48
    # Its CPU was not recorded, and the two machines measured since ran it 2.5 and 3.4 times faster: it says so
    # wherever it is used.
    assert cpu.measured.machine.cpu is None and "was measured on a CPU not recorded" in (machine_note(cpu) or "")


def test_a_gpu_measurement_with_an_nccl_section_gives_the_all_reduce_and_the_pipeline_link() -> None:
    raw = json.loads((RESULTS / "h200x2_raw.json").read_text())
    given = Link(latency_s=0.001, bytes_per_s=4e10, source="assumed")
    links, notes = with_collectives(raw, {"kv_transfer": given, "allreduce": given}, ["n"])
    assert links["kv_transfer"] == given and links["allreduce"].source.startswith("NCCL all-reduce on 2x NVIDIA H200")
    assert links["pipeline"].source == "peer-to-peer copy on NVIDIA H200" and notes == ["n"]
    without = {k: v for k, v in raw.items() if k != "nccl"}
    assert with_collectives(without, {"allreduce": given}, []) == ({"allreduce": given}, [])


def test_a_gpu_measurement_names_its_machine_and_an_old_one_says_what_it_did_not_record() -> None:
    raw = json.loads((RESULTS / "h100_raw.json").read_text())
    old = machine_of(raw)
    assert (old.gpu, old.driver, old.cpu) == ("NVIDIA H100 80GB HBM3", None, None)
    assert old.source.endswith("(driver and CPU not recorded then)")
    raw["info"] |= {"driver": "580.159.04", "cpu": "INTEL(R) XEON(R) PLATINUM 8480+", "cores": 16}
    new = machine_of(raw, vllm="0.32.0")
    assert (new.driver, new.cpu, new.cores, new.vllm) == ("580.159.04", "INTEL(R) XEON(R) PLATINUM 8480+", 16, "0.32.0")
    assert new.describe() == "NVIDIA H100 80GB HBM3 (driver 580.159.04)" and "not recorded" not in new.source
