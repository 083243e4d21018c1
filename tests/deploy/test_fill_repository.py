"""deploy/triton/fill_repository.sh, run as an operator runs it, against a stand-in checkout.

TensorRT-LLM's repository cannot be installed here, and its files may not be
copied into this one, so TRTLLM_DIR is a directory in tmp_path holding our
own minimal templates (written below: our text, with `${...}` placeholders in
and out of `string_value`) and a small stand-in for its
triton_backend/tools/fill_template.py that keeps the contract the script relies
on: `fill_template.py -i FILE key:value,...` substitutes in place, refuses a key
the file lacks, and splits twice, the list on ',' and then each pair on ':',
each split taking one level of backslash escapes (so a ',' or ':' in a value
must be escaped for both). The tokenizer is a real one, built with the
`tokenizers` library; the engine's config.json is the part the script reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "fill_repository.sh"
BASH = shutil.which("bash")

FILL_TEMPLATE = r'''
import re
import sys


def split(text, sep):
    """Split on SEP; a backslash makes the next character plain."""
    parts, current, chars = [], "", iter(text)
    for char in chars:
        if char == "\\":
            current += next(chars, "")
        elif char == sep:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


flag, path, substitutions = sys.argv[1:]
assert flag == "-i", "the script always edits in place"
with open(path) as f:
    text = f.read()
values = {}
for pair in split(substitutions, ","):
    key, value = split(pair, ":")  # a ':' left unescaped here fails, as the real one does
    if "${" + key + "}" not in text:
        sys.exit(f"key '{key}' does not exist in the file {path}.")
    values[key] = value
text = re.sub(r"\$\{(\w+)\}", lambda m: values.get(m[1], m[0]), text)
with open(path, "w") as f:
    f.write(text)
'''

# Our own minimal templates: just the lines the script's fill calls touch, a
# placeholder inside a string_value it does not fill (allowed: read as unset),
# and keys it passes that some template versions lack (skipped with a note).
TEMPLATES = {
    "ensemble": """name: "ensemble"
max_batch_size: ${triton_max_batch_size}
output [ { name: "context_logits" data_type: ${logits_datatype} } ]
""",
    "preprocessing": """name: "preprocessing"
max_batch_size: ${triton_max_batch_size}
parameters { key: "tokenizer_dir" value: { string_value: "${tokenizer_dir}" } }
parameters { key: "add_special_tokens" value: { string_value: "${add_special_tokens}" } }
parameters { key: "vision_model_path" value: { string_value: "${vision_model_path}" } }
instance_group [ { count: ${preprocessing_instance_count} kind: KIND_CPU } ]
""",
    "tensorrt_llm": """name: "tensorrt_llm"
backend: "${triton_backend}"
max_batch_size: ${triton_max_batch_size}
model_transaction_policy { decoupled: ${decoupled_mode} }
dynamic_batching {
  max_queue_delay_microseconds: ${max_queue_delay_microseconds}
  default_queue_policy: { max_queue_size: ${max_queue_size} }
}
input [ { name: "prompt_embedding_table" data_type: ${prompt_embedding_table_data_type} } ]
output [ { name: "generation_logits" data_type: ${logits_datatype} } ]
parameters: { key: "max_beam_width" value: { string_value: "${max_beam_width}" } }
parameters: { key: "gpt_model_type" value: { string_value: "${batching_strategy}" } }
parameters: { key: "gpt_model_path" value: { string_value: "${engine_dir}" } }
parameters: { key: "batch_scheduler_policy" value: { string_value: "${batch_scheduler_policy}" } }
parameters: { key: "kv_cache_free_gpu_mem_fraction" value: { string_value: "${kv_cache_free_gpu_mem_fraction}" } }
parameters: { key: "enable_kv_cache_reuse" value: { string_value: "${enable_kv_cache_reuse}" } }
parameters: { key: "enable_chunked_context" value: { string_value: "${enable_chunked_context}" } }
parameters: { key: "exclude_input_in_output" value: { string_value: "${exclude_input_in_output}" } }
""",
    "postprocessing": """name: "postprocessing"
max_batch_size: ${triton_max_batch_size}
parameters { key: "tokenizer_dir" value: { string_value: "${tokenizer_dir}" } }
instance_group [ { count: ${postprocessing_instance_count} kind: KIND_CPU } ]
""",
    # A version of the BLS model with none of the keys the script fills.
    "tensorrt_llm_bls": """name: "tensorrt_llm_bls"
max_batch_size: 8
""",
}


def make_checkout(root: Path, templates: dict[str, str] = TEMPLATES) -> Path:
    base = root / "TensorRT-LLM" / "triton_backend"
    for model, text in templates.items():
        (base / "all_models" / "inflight_batcher_llm" / model).mkdir(parents=True)
        (base / "all_models" / "inflight_batcher_llm" / model / "config.pbtxt").write_text(text)
    (base / "tools").mkdir(parents=True)
    (base / "tools" / "fill_template.py").write_text(FILL_TEMPLATE)
    return root / "TensorRT-LLM"


def make_tokenizer(directory: Path) -> Path:
    """A tokenizer.json that puts a BOS in front of every prompt, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(
        models.WordLevel(vocab={"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3}, unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def make_engine(directory: Path, **build_config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps({"version": "x", "build_config": build_config, "pretrained_config": {}})
    )
    return directory


def fill(trtllm: Path, repo: Path, **env) -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if k not in ("ADD_SPECIAL_TOKENS", "TP")}
    run_env.update({"TRTLLM_DIR": str(trtllm), "PYTHON": sys.executable, **env})
    return subprocess.run(
        [BASH, str(SCRIPT), str(repo)], env=run_env, capture_output=True, text=True, timeout=60
    )


def notes(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("note: ")]


@pytest.fixture
def deployment(tmp_path):
    """A checkout, an engine (in a directory whose name has ',' and ':') and a tokenizer."""
    return {
        "trtllm": make_checkout(tmp_path),
        "engine": make_engine(
            tmp_path / "engines" / "llama:v2,fp8", max_input_len=3072, max_seq_len=8192
        ),
        "tokenizer": make_tokenizer(tmp_path / "hf" / "llama"),
        "repo": tmp_path / "repo",
    }


def test_fills_every_model_and_prints_the_catalog_values(deployment):
    trtllm, engine, tokenizer, repo = deployment.values()

    result = fill(
        trtllm, repo, ENGINE_DIR=str(engine), TOKENIZER_DIR=str(tokenizer),
        MAX_BATCH_SIZE="32", INSTANCE_COUNT="2", KV_CACHE_FREE_GPU_MEM_FRACTION="0.85",
        MAX_QUEUE_DELAY_MICROSECONDS="100",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    config = {model: (repo / model / "config.pbtxt").read_text() for model in TEMPLATES}
    # the engine path arrives whole, its ',' and ':' through both of fill_template's splits
    assert f'gpt_model_path" value: {{ string_value: "{engine}" }}' in config["tensorrt_llm"]
    assert f'string_value: "{tokenizer}"' in config["preprocessing"]
    assert f'string_value: "{tokenizer}"' in config["postprocessing"]
    for model in ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing"):
        assert "max_batch_size: 32\n" in config[model]
    assert 'backend: "tensorrtllm"' in config["tensorrt_llm"]
    assert "decoupled: true" in config["tensorrt_llm"]
    assert "max_queue_delay_microseconds: 100\n" in config["tensorrt_llm"]
    assert "max_queue_size: 0 }" in config["tensorrt_llm"]
    assert "data_type: TYPE_FP16 }" in config["tensorrt_llm"]
    assert "data_type: TYPE_FP32 }" in config["ensemble"]
    for key, value in [
        ("max_beam_width", "1"), ("gpt_model_type", "inflight_fused_batching"),
        ("batch_scheduler_policy", "guaranteed_no_evict"),
        ("kv_cache_free_gpu_mem_fraction", "0.85"), ("enable_kv_cache_reuse", "true"),
        ("enable_chunked_context", "true"), ("exclude_input_in_output", "true"),
    ]:  # fmt: skip
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in config["tensorrt_llm"]
    assert 'string_value: "true"' in config["preprocessing"]  # add_special_tokens
    assert "count: 2 kind" in config["preprocessing"]
    assert "count: 2 kind" in config["postprocessing"]
    # and a placeholder inside a string_value the script does not fill is left for the backend
    assert 'string_value: "${vision_model_path}"' in config["preprocessing"]
    assert "${" not in config["tensorrt_llm"] + config["ensemble"] + config["postprocessing"]
    # and the checkout's templates are untouched
    for model, text in TEMPLATES.items():
        assert (trtllm / "triton_backend/all_models/inflight_batcher_llm" / model / "config.pbtxt").read_text() == text  # fmt: skip
    # and the start command and the catalog values
    lines = result.stdout.splitlines()
    assert (
        f"  tritonserver --model-repository={repo} --grpc-port=8001 --http-port=8000"
        " --metrics-port=8002" in lines
    )
    assert f"  tokenizer_file         {tokenizer}/tokenizer.json" in result.stdout
    # read by transformers where the host has it (a GPU host's image does), else by tokenizers
    assert {"  prompt_special_tokens  1  (read by tokenizers (no transformers here))",
            "  prompt_special_tokens  1  (read by transformers)"} & set(lines)  # fmt: skip
    assert "  max_input_tokens       3072" in lines
    assert "  context_limit          at most 8192" in lines


def test_keys_a_template_lacks_are_skipped_with_a_note(deployment):
    trtllm, engine, tokenizer, repo = deployment.values()

    result = fill(trtllm, repo, ENGINE_DIR=str(engine), TOKENIZER_DIR=str(tokenizer))

    assert result.returncode == 0, result.stderr
    assert notes(result) == [
        "note: tensorrt_llm has no ${encoder_input_features_data_type}; skipped",
        "note: tensorrt_llm_bls has no ${triton_max_batch_size}; skipped",
        "note: tensorrt_llm_bls has no ${decoupled_mode}; skipped",
        "note: tensorrt_llm_bls has no ${bls_instance_count}; skipped",
        "note: tensorrt_llm_bls has no ${accumulate_tokens}; skipped",
        "note: tensorrt_llm_bls has no ${prompt_embedding_table_data_type}; skipped",
        "note: tensorrt_llm_bls has no ${logits_datatype}; skipped",
    ]
    # a model with nothing to fill is copied as it is
    assert (repo / "tensorrt_llm_bls" / "config.pbtxt").read_text() == TEMPLATES["tensorrt_llm_bls"]


def test_a_placeholder_left_outside_a_string_value_fails_the_script(tmp_path, deployment):
    # given a newer template with a key the script does not know, where a number goes
    templates = {**TEMPLATES}
    templates["postprocessing"] += "dynamic_batching { max_queue_delay_microseconds: ${postprocessing_delay} }\n"  # fmt: skip
    trtllm = make_checkout(tmp_path / "newer", templates)

    result = fill(
        trtllm, deployment["repo"],
        ENGINE_DIR=str(deployment["engine"]), TOKENIZER_DIR=str(deployment["tokenizer"]),
    )  # fmt: skip

    assert result.returncode == 1
    assert "fill_repository.sh: placeholders above are still unfilled; add them to the fill calls" in result.stderr  # fmt: skip
    assert (
        f"{deployment['repo']}/postprocessing/config.pbtxt:5:dynamic_batching"
        " { max_queue_delay_microseconds: ${postprocessing_delay} }" in result.stdout
    )
    assert "Model repository ready" not in result.stdout


def test_add_special_tokens_false_counts_none_and_tensor_parallel_uses_mpi(deployment):
    trtllm, engine, tokenizer, repo = deployment.values()

    result = fill(
        trtllm, repo, ENGINE_DIR=str(engine), TOKENIZER_DIR=str(tokenizer),
        ADD_SPECIAL_TOKENS="false", TP="2",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert (
        'key: "add_special_tokens" value: { string_value: "false" }'
        in (repo / "preprocessing" / "config.pbtxt").read_text()
    )
    lines = result.stdout.splitlines()
    assert "  prompt_special_tokens  0  (read by ADD_SPECIAL_TOKENS=false)" in lines
    assert (
        f"  python3 {trtllm}/triton_backend/scripts/launch_triton_server.py --world_size=2"
        f" --model_repo={repo} --grpc_port=8001 --http_port=8000 --metrics_port=8002" in lines
    )


def test_without_the_engine_config_it_warns_and_says_where_to_read_the_limit(tmp_path, deployment):
    engine = tmp_path / "mounted-elsewhere"

    result = fill(
        deployment["trtllm"], deployment["repo"], ENGINE_DIR=str(engine),
        TOKENIZER_DIR=str(deployment["tokenizer"]),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert f"warning: no {engine}/config.json here" in result.stderr
    assert (
        f"  max_input_tokens       max_input_len of {engine}/config.json (not readable here)"
        in result.stdout.splitlines()
    )


def test_an_existing_repository_is_refused_and_left_alone(deployment):
    trtllm, engine, tokenizer, repo = deployment.values()
    (repo / "ensemble").mkdir(parents=True)
    (repo / "ensemble" / "config.pbtxt").write_text("filled earlier\n")

    result = fill(trtllm, repo, ENGINE_DIR=str(engine), TOKENIZER_DIR=str(tokenizer))

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"fill_repository.sh: {repo} already exists; fill_template.py edits in place,"
        " so start from a fresh copy"
    )
    assert [p.name for p in repo.iterdir()] == ["ensemble"]
    assert (repo / "ensemble" / "config.pbtxt").read_text() == "filled earlier\n"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_checkout", "no templates at {trtllm}/triton_backend/all_models/inflight_batcher_llm"),
        ("no_postprocessing", "template postprocessing missing from {trtllm}/triton_backend/all_models/inflight_batcher_llm"),
        ("no_fill_template", "no fill_template.py at {trtllm}/triton_backend/tools/fill_template.py"),
    ],
)  # fmt: skip
def test_missing_templates_are_refused_before_the_repository_is_made(
    tmp_path, deployment, breakage, message
):
    trtllm = deployment["trtllm"]
    if breakage == "no_checkout":
        shutil.rmtree(trtllm / "triton_backend")
    elif breakage == "no_postprocessing":
        shutil.rmtree(trtllm / "triton_backend/all_models/inflight_batcher_llm/postprocessing")
    else:
        (trtllm / "triton_backend/tools/fill_template.py").unlink()

    result = fill(
        trtllm, deployment["repo"],
        ENGINE_DIR=str(deployment["engine"]), TOKENIZER_DIR=str(deployment["tokenizer"]),
    )  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.strip() == "fill_repository.sh: " + message.format(trtllm=trtllm)
    # so a rerun once the checkout is complete is not refused for a half-made repository
    assert not deployment["repo"].exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_BATCH_SIZE": "0"}, "MAX_BATCH_SIZE must be a positive integer"),
        ({"TP": "two"}, "TP must be a positive integer"),
        ({"ADD_SPECIAL_TOKENS": "yes"}, "ADD_SPECIAL_TOKENS must be true or false"),
        ({"ENGINE_DIR": ""}, "set ENGINE_DIR to the engine directory"),
    ],
)
def test_bad_settings_are_refused(deployment, env, message):
    settings = {
        "ENGINE_DIR": str(deployment["engine"]),
        "TOKENIZER_DIR": str(deployment["tokenizer"]),
        **env,
    }

    result = fill(deployment["trtllm"], deployment["repo"], **settings)

    assert result.returncode == 1
    assert result.stderr.strip() == f"fill_repository.sh: {message}"
    assert not deployment["repo"].exists()
