"""deploy/triton/build_engines.sh in its dry run (DRY_RUN=1), as an operator reviews a build.

There is no GPU in CI, so the one thing the script asks of the machine,
`nvidia-smi`, is stood in at that boundary: a tiny script first on PATH that
answers the two queries the script makes (compute_cap and name) as an H200
(9.0), an L40S (8.9) or an A100 (8.0) would, and fails on any other question.
Everything else is the real script, run as operators run it; TRTLLM_DIR is left
unset, as before they have a checkout. The tests assert the exact command lines
it prints, since those are what a real build would run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "build_engines.sh"
BASH = shutil.which("bash")

GPUS = {"9.0": "NVIDIA H200", "8.9": "NVIDIA L40S", "8.0": "NVIDIA A100-SXM4-80GB"}

QUANTIZE = "$TRTLLM_DIR/examples/quantization/quantize.py"
CONVERT = "$TRTLLM_DIR/examples/models/core/llama/convert_checkpoint.py"

# PRECISION -> (step 1's script, its arguments after the shared ones, what to record
# as CatalogModel.kv_cache_dtype), with the default DTYPE=bfloat16.
STEP_ONE = {
    "fp8": (QUANTIZE, "--qformat fp8 --kv_cache_dtype fp8", "fp8"),
    "int8_sq": (QUANTIZE, "--qformat int8_sq --kv_cache_dtype int8", "int8"),
    "int4_awq": (QUANTIZE, "--qformat int4_awq", "bf16"),
    "int8_wo": (CONVERT, "--dtype bfloat16 --use_weight_only --weight_only_precision int8", "bf16"),
    "fp16": (CONVERT, "--dtype float16", "fp16"),
    "bf16": (CONVERT, "--dtype bfloat16", "bf16"),
}

# Every variable the script reads: the test's own environment must not leak in.
SCRIPT_ENV = (
    "TRTLLM_DIR", "CONVERT_SCRIPT", "DTYPE", "MAX_BATCH_SIZE", "MAX_INPUT_LEN", "MAX_SEQ_LEN",
    "MAX_NUM_TOKENS", "CALIB_SIZE", "FP8_CONTEXT_FMHA", "PYTHON", "DRY_RUN",
)  # fmt: skip


def fake_nvidia_smi(bin_dir: Path, cap: str) -> None:
    """An `nvidia-smi` that knows one GPU and the two questions build_engines.sh asks."""
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  "--query-gpu=compute_cap --format=csv,noheader") echo "{cap}"; echo "{cap}" ;;\n'
        f'  "--query-gpu=name --format=csv,noheader") echo "{GPUS[cap]}"; echo "{GPUS[cap]}" ;;\n'
        '  *) echo "fake nvidia-smi: not a question build_engines.sh asks: $*" >&2; exit 9 ;;\n'
        "esac\n"
    )
    smi.chmod(0o755)


def build(tmp_path, *args, cap="9.0", path=None, **env) -> subprocess.CompletedProcess:
    """Run build_engines.sh with ARGS (default: hf/ out/ given precision 2), in a dry run
    unless env says otherwise, with the fake nvidia-smi for CAP first on PATH."""
    bin_dir = tmp_path / "bin"
    if cap is not None:
        fake_nvidia_smi(bin_dir, cap)
    run_env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    run_env["PATH"] = path if path is not None else f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    run_env.update({"DRY_RUN": "1", **env})
    return subprocess.run(
        [BASH, str(SCRIPT), *args], env=run_env, capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def hf(tmp_path) -> Path:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    return hf_dir


def commands(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("+ ")]


def expected_commands(hf, out, precision, *, fp8_fmha: bool) -> list[str]:
    script, args, _kv = STEP_ONE[precision]
    if script == QUANTIZE:
        shared = f"--model_dir {hf} --output_dir {out}/checkpoint --dtype bfloat16 --tp_size 2 --calib_size 512"
    else:
        shared = f"--model_dir {hf} --output_dir {out}/checkpoint --tp_size 2"
    build_line = (
        f"+ trtllm-build --checkpoint_dir {out}/checkpoint --output_dir {out}/engine"
        " --gemm_plugin auto --max_batch_size 64 --max_input_len 4096 --max_seq_len 8192"
        " --max_num_tokens 8192 --use_paged_context_fmha enable"
    )
    if fp8_fmha:
        build_line += " --use_fp8_context_fmha enable"
    return [f"+ python3 {script} {shared} {args}", build_line]


@pytest.mark.parametrize("cap", ["9.0", "8.9", "8.0"])
@pytest.mark.parametrize("precision", list(STEP_ONE))
def test_dry_run_prints_the_exact_commands_and_catalog_values(tmp_path, hf, precision, cap):
    # given a checkpoint directory and a GPU of compute capability CAP
    out = tmp_path / "out"

    # when an operator reviews the build
    result = build(tmp_path, str(hf), str(out), precision, "2", cap=cap)

    # then fp8 is refused below 8.9, before any command is shown
    if precision == "fp8" and cap == "8.0":
        assert result.returncode == 1, result
        assert result.stderr.strip() == (
            "build_engines.sh: fp8 needs compute capability >= 8.9 (Ada/Hopper);"
            " this GPU (NVIDIA A100-SXM4-80GB) is 8.0"
        )
        assert commands(result) == []
        assert not out.exists()
        return
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"GPU 0: {GPUS[cap]}, compute capability {cap}"
    # and the two commands a build would run, FP8 context FMHA on Hopper only
    fp8_fmha = precision == "fp8" and cap == "9.0"
    assert commands(result) == expected_commands(hf, out, precision, fp8_fmha=fp8_fmha)
    # and what to record on the CatalogModel row
    kv = STEP_ONE[precision][2]
    assert (
        f"  precision={precision} kv_cache_dtype={kv} tensor_parallel=2 gpu_type={GPUS[cap]}"
        in result.stdout.splitlines()
    )
    assert f"Engine: {out}/engine" in result.stdout
    assert "DRY_RUN=1: nothing above was run; nothing was created." in result.stdout
    # and nothing was created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "hf"]


@pytest.mark.parametrize(
    ("cap", "setting", "precision", "flag"),
    [
        ("8.9", "enable", "fp8", True),
        ("9.0", "disable", "fp8", False),
        ("9.0", "auto", "fp8", True),
        ("9.0", "enable", "fp16", False),  # FP8 context FMHA is for fp8 engines only
    ],
)
def test_fp8_context_fmha_setting_overrides_the_gpu(tmp_path, hf, cap, setting, precision, flag):
    result = build(
        tmp_path, str(hf), str(tmp_path / "out"), precision, "1", cap=cap, FP8_CONTEXT_FMHA=setting
    )

    assert result.returncode == 0, result.stderr
    trtllm_build = shlex.split(commands(result)[1][2:])
    assert trtllm_build[0] == "trtllm-build"
    assert ("--use_fp8_context_fmha" in trtllm_build) is flag
    if flag:
        assert trtllm_build[-2:] == ["--use_fp8_context_fmha", "enable"]


def test_without_nvidia_smi_it_says_so_and_leaves_fp8_to_the_operator(tmp_path, hf):
    # given a PATH that holds only what the script needs, and no nvidia-smi
    only = tmp_path / "only"
    only.mkdir()
    for tool in ("cat", "head"):
        (only / tool).symlink_to(shutil.which(tool))
    out = tmp_path / "out"

    result = build(tmp_path, str(hf), str(out), "fp8", "1", cap=None, path=str(only))

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "no GPU visible (nvidia-smi absent or silent): fp8 is not checked against the GPU"
    )
    # no capability known: no FP8 context FMHA under auto, no GPU model to record
    assert commands(result)[1].endswith("--use_paged_context_fmha enable")
    assert "kv_cache_dtype=fp8 tensor_parallel=1 gpu_type=<GPU model>" in result.stdout


def test_given_paths_are_shell_quoted_and_the_older_checkout_layout_is_found(tmp_path, hf):
    # given a checkout that has only the older examples/llama layout, and limits
    trtllm = tmp_path / "TensorRT-LLM"
    (trtllm / "examples" / "llama").mkdir(parents=True)
    (trtllm / "examples" / "llama" / "convert_checkpoint.py").touch()
    out = tmp_path / "my engines" / "m'1"

    result = build(
        tmp_path, str(hf), str(out), "int8_wo", "4", cap="9.0",
        TRTLLM_DIR=str(trtllm), DTYPE="float16", PYTHON="/opt/py 3/bin/python",
        MAX_BATCH_SIZE="16", MAX_INPUT_LEN="2048", MAX_SEQ_LEN="4096", MAX_NUM_TOKENS="1024",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    convert, trtllm_build = (shlex.split(line[2:]) for line in commands(result))
    assert convert == [
        "/opt/py 3/bin/python", f"{trtllm}/examples/llama/convert_checkpoint.py",
        "--model_dir", str(hf), "--output_dir", f"{out}/checkpoint", "--tp_size", "4",
        "--dtype", "float16", "--use_weight_only", "--weight_only_precision", "int8",
    ]  # fmt: skip
    assert trtllm_build == [
        "trtllm-build", "--checkpoint_dir", f"{out}/checkpoint", "--output_dir", f"{out}/engine",
        "--gemm_plugin", "auto", "--max_batch_size", "16", "--max_input_len", "2048",
        "--max_seq_len", "4096", "--max_num_tokens", "1024", "--use_paged_context_fmha", "enable",
    ]  # fmt: skip
    assert "kv_cache_dtype=fp16 tensor_parallel=4" in result.stdout
    assert "  context_limit <= 4096" in result.stdout.splitlines()
    assert not (tmp_path / "my engines").exists()


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["{hf}", "{out}", "fp8"], {}, 2, "Usage: build_engines.sh HF_CHECKPOINT_DIR"),
        (["{hf}", "{out}", "fp8", "2", "x"], {}, 2, "Usage: build_engines.sh HF_CHECKPOINT_DIR"),
        (["{hf}/nope", "{out}", "fp8", "1"], {}, 1, "no such checkpoint directory: {hf}/nope"),
        (["{hf}", "{out}", "fp8", "0"], {}, 1, "TP_SIZE must be a positive integer, got '0'"),
        (["{hf}", "{out}", "fp8", "two"], {}, 1, "TP_SIZE must be a positive integer, got 'two'"),
        (["{hf}", "{out}", "fp8", "1"], {"DTYPE": "fp32"}, 1, "DTYPE must be bfloat16 or float16"),
        (["{hf}", "{out}", "fp4", "1"], {}, 1, "unknown precision 'fp4'"),
        (["{hf}", "{out}", "fp8", "1"], {"FP8_CONTEXT_FMHA": "on"}, 1,
         "FP8_CONTEXT_FMHA must be auto, enable or disable"),
        (["{hf}", "{out}", "fp8", "1"], {"DRY_RUN": "yes"}, 1, "DRY_RUN must be 0 or 1"),
        (["{hf}", "{out}", "fp8", "1"], {"DRY_RUN": "0"}, 1,
         "set TRTLLM_DIR to a TensorRT-LLM checkout"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, hf, args, env, code, message):
    out = tmp_path / "out"
    argv = [a.format(hf=hf, out=out) for a in args]

    result = build(tmp_path, *argv, **env)

    assert result.returncode == code, result
    assert message.format(hf=hf) in result.stderr
    assert commands(result) == []
    assert not out.exists()


def test_an_existing_engine_is_never_overwritten(tmp_path, hf):
    # given an engine built earlier in the output directory
    (tmp_path / "out" / "engine").mkdir(parents=True)

    result = build(tmp_path, str(hf), str(tmp_path / "out"), "bf16", "1")

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"build_engines.sh: {tmp_path}/out/engine already exists; refusing to overwrite"
    )
    assert commands(result) == []
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "engine"]


def test_a_real_run_without_the_checkout_stops_before_creating_anything(tmp_path, hf):
    # given TRTLLM_DIR naming an empty directory, and no dry run
    trtllm = tmp_path / "TensorRT-LLM"
    trtllm.mkdir()

    result = build(tmp_path, str(hf), str(tmp_path / "out"), "fp8", "1", DRY_RUN="0",
                   TRTLLM_DIR=str(trtllm))  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"build_engines.sh: no quantize.py at {trtllm}/examples/quantization/quantize.py"
        " (set TRTLLM_DIR, or CONVERT_SCRIPT for convert_checkpoint.py)"
    )
    assert commands(result) == []
    assert not (tmp_path / "out").exists()
