"""transformers and torchvision models, unmodified (cloud/hub.py), through `cicada pack`.

Tiny models are built from configs in code and saved locally (`save_pretrained`, or a state
dict file for torchvision); nothing is downloaded. Each is packed from its directory and from
its class with config and weights, and every strategy cold-starts both packages in one fresh
process: the outputs must be bit-identical to the library's own eager model on the same
weights. torchvision tests skip where torchvision cannot be imported (CI: PyPI's torchvision
does not import beside the CPU torch wheel) and run in a venv that has it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from cicada.cli import main
from cicada.cloud.hub import TRANSFORMERS_FACTORY, load_transformers_dir
from cicada.cloud.loading import cpu as reader_module
from cicada.cloud.loading.cpu import CpuStageSource
from cicada.cloud.loading.registry import builtin_strategies
from cicada.cloud.packing import pack
from cicada.cloud.pipeline import ColdStart
from cicada.common.package import WEIGHTS_NAME, Manifest

ROOT = Path(__file__).resolve().parents[2]

# One fresh process cold-starts each package with every strategy, cicada first, so its reader
# starts before `import torch` as in `cicada run`; the rest reuse the imported modules.
DRIVER = """
import sys
from pathlib import Path
from cicada.cloud.loading.registry import builtin_strategies
from cicada.cloud.runner import run_cold_start
x, out, *packages = map(Path, sys.argv[1:])
for package in packages:
    for strategy in builtin_strategies():
        saved = out / f"{package.name}-{strategy}.npy"
        run_cold_start(package, x, strategy=strategy, out_path=saved, threads=1)
"""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Eager references run on one thread, as the fresh processes do: a float reduction split
    over another thread count may differ in its last bit, and other tests in this process may
    have changed torch's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _every_strategy_in_a_fresh_process(x: np.ndarray, work: Path, packages: list[Path]) -> None:
    np.save(work / "x.npy", x)
    subprocess.run(
        [sys.executable, "-c", DRIVER, str(work / "x.npy"), str(work), *map(str, packages)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip


def _assert_served_equal(work: Path, package: Path, expected: torch.Tensor) -> None:
    for strategy in builtin_strategies():
        got = torch.from_numpy(np.load(work / f"{package.name}-{strategy}.npy"))
        assert got.dtype == expected.dtype and got.shape == expected.shape, strategy
        assert torch.equal(got, expected), f"{package.name} {strategy}: differs from eager"


def _gated_cold_start(package: Path, *inputs: torch.Tensor) -> tuple[ColdStart, Any, list[int]]:
    """A cold start whose reader hands over stage k only once the forward is waiting for it.

    A module that used a stage's tensors without waiting for them would compute on the
    uninitialised placeholders (the output would differ from eager); a forward that needed the
    stages out of order would stall until the gate's timeout (listed in the result)."""
    original = reader_module.stage_checksum
    holder: dict[str, ColdStart] = {}
    reads: list[int] = []
    stalled: list[int] = []

    def gated(view: memoryview) -> str:
        index = len(reads)
        reads.append(index)
        if index > 0:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                cold = holder.get("cold")
                if cold is not None and cold._segment_stage == index:
                    break
                time.sleep(0.001)
            else:
                stalled.append(index)
        return original(view)

    reader_module.stage_checksum = gated
    try:
        cold = holder["cold"] = ColdStart(package)
        cold.build()
        out = cold.forward(*inputs)
    finally:
        reader_module.stage_checksum = original
    return cold, out, stalled


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- transformers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HubCase:
    class_name: str
    config: dict[str, Any]
    blocks: str  # the block list's path
    pre: list[str]  # modules of the first stage (embeddings)
    post: list[str]  # modules of the last stage (final norm, head)


TINY = {"vocab_size": 97, "bos_token_id": 0, "eos_token_id": 0}
HUB_CASES = {
    "gpt2": HubCase(
        "GPT2LMHeadModel",
        {**TINY, "n_layer": 3, "n_embd": 32, "n_head": 2, "n_positions": 64},
        "transformer.h",
        ["transformer.wte", "transformer.wpe"],
        ["transformer.ln_f"],  # lm_head is tied to transformer.wte: stored in the first stage
    ),
    "bert": HubCase(
        "BertModel",
        {
            "vocab_size": 97,
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
        "encoder.layer",
        [
            "embeddings.word_embeddings",
            "embeddings.position_embeddings",
            "embeddings.token_type_embeddings",
            "embeddings.LayerNorm",
        ],
        ["pooler.dense"],
    ),
    "llama": HubCase(
        "LlamaForCausalLM",
        {
            **TINY,
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
        "model.layers",
        ["model.embed_tokens"],
        ["model.norm", "lm_head"],
    ),
}


@dataclass
class Saved:
    case: HubCase
    directory: Path  # save_pretrained's output
    by_dir: Path  # package from `cicada pack --transformers DIR`
    by_class: Path  # package from `--transformers-class CLASS --config --weights`
    x: torch.Tensor
    expected: torch.Tensor  # from_pretrained(directory)(x), eager
    layers: int


def _transformers() -> Any:
    return pytest.importorskip("transformers")


def _tiny_transformers_model(case: HubCase, seed: int = 0) -> Any:
    transformers = _transformers()
    cls = getattr(transformers, case.class_name)
    config = cls.config_class(**case.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


@pytest.fixture(scope="module", params=list(HUB_CASES))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    case = HUB_CASES[request.param]
    work = tmp_path_factory.mktemp(request.param)
    model = _tiny_transformers_model(case)
    model.save_pretrained(work / "model")
    result = _cli("pack", "--transformers", work / "model", "--out", work / "by_dir")
    assert result.exit_code == 0, result.output
    result = _cli(
        "pack", "--transformers-class", case.class_name, "--config", work / "model/config.json",
        "--weights", work / "model/model.safetensors", "--out", work / "by_class",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    x = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    eager = type(model).from_pretrained(work / "model", local_files_only=True)
    with torch.inference_mode(), one_thread():
        expected = eager(x)[0]
        assert torch.equal(expected, model(x)[0])
    layers = len(model.get_submodule(case.blocks))
    return Saved(case, work / "model", work / "by_dir", work / "by_class", x, expected, layers)


def test_stages_are_embeddings_blocks_head_in_forward_order(saved: Saved) -> None:
    manifest = Manifest.load(saved.by_dir)
    assert manifest.architecture.factory == TRANSFORMERS_FACTORY
    assert manifest.staging_method == "blocks"
    blocks = [f"{saved.case.blocks}.{i}" for i in range(saved.layers)]
    assert [s.name for s in manifest.stages] == ["pre", *blocks, "post"]
    assert len(manifest.stages) == saved.layers + 2
    assert list(manifest.stages[0].modules) == saved.case.pre
    assert [list(s.modules) for s in manifest.stages[1:-1]] == [[b] for b in blocks]
    assert list(manifest.stages[-1].modules) == saved.case.post
    for stage, block in zip(manifest.stages[1:-1], blocks, strict=True):
        assert all(t.name.startswith(block + ".") for t in stage.tensors)


def test_directory_and_class_with_config_make_the_same_package(saved: Saved) -> None:
    by_dir, by_class = Manifest.load(saved.by_dir), Manifest.load(saved.by_class)
    assert _sha256(saved.by_dir / WEIGHTS_NAME) == _sha256(saved.by_class / WEIGHTS_NAME)
    assert by_dir.stages == by_class.stages
    assert by_dir.aliases == by_class.aliases
    arch = by_class.architecture.config
    assert arch["class_name"] == saved.case.class_name
    assert arch["config"] == json.loads((saved.directory / "config.json").read_text())


def test_every_strategy_in_a_fresh_process_is_bit_identical_to_eager(
    saved: Saved, tmp_path: Path
) -> None:
    packages = [saved.by_dir, saved.by_class]
    _every_strategy_in_a_fresh_process(saved.x.numpy(), tmp_path, packages)
    for package in packages:
        _assert_served_equal(tmp_path, package, saved.expected)


def test_forward_waits_for_each_stage_in_order(saved: Saved) -> None:
    with one_thread():
        cold, out, stalled = _gated_cold_start(saved.by_dir, saved.x)
    assert stalled == [], f"the forward needed stages out of order (stalled at {stalled})"
    assert torch.equal(out, saved.expected)
    assert cold.all_resident


def test_rebuild_keeps_ties_buffers_and_the_mapped_weights(saved: Saved) -> None:
    transformers = _transformers()
    cold = ColdStart(saved.by_dir)
    model = cold.build()
    cold.wait_all()
    eager = getattr(transformers, saved.case.class_name).from_pretrained(
        saved.directory, local_files_only=True
    )
    assert type(model) is type(eager)
    assert not model.training
    # Tied weights stay one Parameter, as the library ties them.
    ties = [(a, b) for a, b in _shared(eager)]
    assert [(a, b) for a, b in _shared(model)] == ties
    if saved.case.class_name == "GPT2LMHeadModel":
        assert ties == [("lm_head.weight", "transformer.wte.weight")]
    # Non-persistent buffers (rotary inv_freq, position ids) are what eager construction makes.
    persistent = set(eager.state_dict())
    buffers = {n: b for n, b in eager.named_buffers() if n not in persistent}
    assert buffers or saved.case.class_name == "GPT2LMHeadModel"
    rebuilt = dict(model.named_buffers())
    for name, buffer in buffers.items():
        assert rebuilt[name].dtype == buffer.dtype and torch.equal(rebuilt[name], buffer), name
    # Every parameter is a view of the mapped package file: no second copy.
    assert isinstance(cold.source, CpuStageSource)
    mapped = cold.source.mapped
    base = np.frombuffer(mapped.map, dtype=np.uint8).ctypes.data
    for name, param in model.named_parameters():
        assert 0 <= param.data_ptr() - base < mapped.size, name


def _shared(model: nn.Module) -> list[tuple[str, str]]:
    first: dict[int, str] = {}
    pairs = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            pairs.append((name, first[id(param)]))
        else:
            first[id(param)] = name
    return pairs


def test_sharded_directory_packs_the_same_weights(saved: Saved, tmp_path: Path) -> None:
    transformers = _transformers()
    model = getattr(transformers, saved.case.class_name).from_pretrained(
        saved.directory, local_files_only=True
    )
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded/model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    loaded, spec, unused = load_transformers_dir(tmp_path / "sharded")
    pack(TRANSFORMERS_FACTORY, tmp_path / "pkg", config=spec, model=loaded)
    assert unused == []
    assert _sha256(tmp_path / "pkg" / WEIGHTS_NAME) == _sha256(saved.by_dir / WEIGHTS_NAME)


def test_output_field_is_selectable(tmp_path: Path) -> None:
    model = _tiny_transformers_model(HUB_CASES["bert"])
    model.save_pretrained(tmp_path / "model")
    result = _cli(
        "pack", "--transformers", tmp_path / "model", "--transformers-output", "pooler_output",
        "--out", tmp_path / "pkg",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    out = ColdStart(tmp_path / "pkg").forward(x)
    with torch.inference_mode():
        assert torch.equal(out, model(x).pooler_output)


# -- errors ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gpt2-errors") / "model"
    _tiny_transformers_model(HUB_CASES["gpt2"]).save_pretrained(directory)
    return directory


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_weights_of_another_shape_are_a_usage_error(gpt2_dir: Path, tmp_path: Path) -> None:
    config = json.loads((gpt2_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 48}))
    result = _cli(
        "pack", "--transformers-class", "GPT2LMHeadModel", "--config", tmp_path / "config.json",
        "--weights", gpt2_dir / "model.safetensors", "--out", tmp_path / "pkg",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "does not fit the model" in result.output
    assert "transformer.wte.weight" in result.output and "[97, 32]" in result.output
    assert not (tmp_path / "pkg").exists()


def test_directory_missing_layers_is_a_usage_error(gpt2_dir: Path, tmp_path: Path) -> None:
    edited = _copy_dir(gpt2_dir, tmp_path / "model")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "n_layer": 4}))
    result = _cli("pack", "--transformers", edited, "--out", tmp_path / "pkg")
    assert result.exit_code == 2
    assert "does not fit GPT2LMHeadModel" in result.output
    assert "transformer.h.3." in result.output
    assert not (tmp_path / "pkg").exists()


def test_corrupt_safetensors_is_a_clear_error(gpt2_dir: Path, tmp_path: Path) -> None:
    broken = _copy_dir(gpt2_dir, tmp_path / "model")
    raw = bytearray((broken / "model.safetensors").read_bytes())
    raw[8:40] = b"\xff" * 32  # inside the JSON header
    (broken / "model.safetensors").write_bytes(bytes(raw))
    result = _cli("pack", "--transformers", broken, "--out", tmp_path / "pkg")
    assert result.exit_code == 2
    assert f"transformers could not load {broken}" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--transformers-class", "GPT2Nonexistent"], "has no model class 'GPT2Nonexistent'"),
        (["--transformers-class", "GPT2Config"], "has no model class 'GPT2Config'"),
        (["--transformers-class", "GPT2LMHeadModel"], "--transformers-class needs --config"),
        (["--torchvision", "resnet50", "--transformers-output", "logits"], "do not go with"),
        (["--model", "cicada.cloud.models.gpt2:build", "--torchvision", "resnet50"],
         "one of --model"),
    ],
)
def test_bad_sources_are_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    _transformers()
    result = _cli("pack", *args, "--out", tmp_path / "pkg")
    assert result.exit_code == 2
    assert "Usage:" in result.output and message in result.output


def test_directory_with_config_or_weights_is_a_usage_error(gpt2_dir: Path, tmp_path: Path) -> None:
    result = _cli(
        "pack", "--transformers", gpt2_dir, "--weights", gpt2_dir / "model.safetensors",
        "--out", tmp_path / "pkg",
    )  # fmt: skip
    assert result.exit_code == 2 and "takes config.json and weights from DIR" in result.output


def test_missing_extra_says_what_to_install(
    gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _transformers()
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    result = _cli("pack", "--transformers", gpt2_dir, "--out", tmp_path / "pkg")
    assert result.exit_code == 2
    assert "pip install 'cicada[hf]'" in result.output


def test_pack_help_explains_each_source() -> None:
    result = _cli("pack", "--help")
    assert result.exit_code == 0
    for option in ["--transformers ", "--transformers-class", "--transformers-output"]:
        assert option in result.output, option
    for text in ["--torchvision", "cicada[hf]", "cicada[vision]", "save_pretrained()"]:
        assert text in result.output, text


def test_core_never_imports_the_extras() -> None:
    code = (
        "import sys, cicada.cli, cicada.cloud.hub, cicada.cloud.packing, cicada.cloud.pipeline, "
        "cicada.cloud.runner, "
        "cicada.cloud.loading.registry, cicada.cloud.stages, cicada.cloud.miniloader; "
        "assert not {'transformers', 'torchvision'} & set(sys.modules), 'an extra was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# -- torchvision -----------------------------------------------------------------------------


def _torchvision() -> Any:
    try:
        import torchvision.models
    except (ImportError, RuntimeError) as exc:  # RuntimeError: built for another torch
        pytest.skip(f"torchvision cannot be imported here: {exc}")
    return torchvision.models


@dataclass(frozen=True)
class VisionCase:
    kwargs: dict[str, Any]
    size: int  # input images are (2, 3, size, size)
    stages: tuple[str, ...]
    weights_file: str  # a .pth read with weights_only=True, or safetensors


VIT_BLOCKS = tuple(f"encoder.layers.encoder_layer_{i}" for i in range(12))
VISION_CASES = {
    "resnet50": VisionCase(
        {"num_classes": 10},
        64,
        ("stem", "layer1", "layer2", "layer3", "layer4", "fc"),
        "weights.safetensors",
    ),
    "vit_b_16": VisionCase(
        {"num_classes": 10, "image_size": 32}, 32, ("pre", *VIT_BLOCKS, "post"), "weights.pth"
    ),
}


def test_resnet50_layout_is_cut_at_its_layers_not_inside_layer4() -> None:
    """resnet50's layer4 alone holds over half the bytes; it is one of four sibling lists of
    the same blocks, so the layers are the stages (checked here without torchvision, on
    cicada's own ResNet in resnet50's layout)."""
    from cicada.cloud.models import resnet
    from cicada.cloud.stages import plan_stages

    model = resnet.build(layers=[3, 4, 6, 3], width=8, num_classes=10)
    state = model.state_dict()
    nbytes = {n: t.numel() * t.element_size() for n, t in state.items()}
    layer4 = sum(b for n, b in nbytes.items() if n.startswith("layer4."))
    assert layer4 > 0.5 * sum(nbytes.values())
    plan = plan_stages(model, list(state), nbytes)
    assert plan.method == "children"
    assert tuple(name for name, _ in plan.stages) == VISION_CASES["resnet50"].stages


@pytest.fixture(scope="module", params=list(VISION_CASES))
def vision(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, torch.Tensor, torch.Tensor]:
    models = _torchvision()
    name, case = request.param, VISION_CASES[request.param]
    work = tmp_path_factory.mktemp(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.get_model(name, weights=None, **case.kwargs).eval()
        # Random running statistics, so batch norm is not the identity it is at init.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    weights = work / case.weights_file
    if weights.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(weights))
    else:
        torch.save(state, weights)
    (work / "kwargs.json").write_text(json.dumps(case.kwargs))
    result = _cli(
        "pack", "--torchvision", name, "--config", work / "kwargs.json", "--weights", weights,
        "--out", work / "pkg",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    x = torch.randn(2, 3, case.size, case.size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), one_thread():
        expected = model(x)
    return name, work / "pkg", x, expected


def test_torchvision_stages(vision: tuple[str, Path, torch.Tensor, torch.Tensor]) -> None:
    name, package, _, _ = vision
    manifest = Manifest.load(package)
    assert tuple(s.name for s in manifest.stages) == VISION_CASES[name].stages
    assert manifest.staging_method == ("children" if name == "resnet50" else "blocks")


def test_torchvision_every_strategy_in_a_fresh_process(
    vision: tuple[str, Path, torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    _, package, x, expected = vision
    _every_strategy_in_a_fresh_process(x.numpy(), tmp_path, [package])
    _assert_served_equal(tmp_path, package, expected)


def test_torchvision_forward_waits_for_each_stage_in_order(
    vision: tuple[str, Path, torch.Tensor, torch.Tensor],
) -> None:
    _, package, x, expected = vision
    with one_thread():
        _, out, stalled = _gated_cold_start(package, x)
    assert stalled == []
    assert torch.equal(out, expected)


def test_torchvision_unknown_name_and_mismatched_weights(tmp_path: Path) -> None:
    models = _torchvision()
    result = _cli("pack", "--torchvision", "resnet51", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "torchvision has no model 'resnet51'" in result.output
    torch.save(models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    result = _cli(
        "pack", "--torchvision", "resnet50", "--weights", tmp_path / "r18.pth", "--out",
        tmp_path / "b",
    )  # fmt: skip
    assert result.exit_code == 2 and "does not fit the model" in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("saved", ["gpt2"], indirect=True)  # one model: preload is generic
def test_a_warm_pool_preloads_the_model_code_and_its_fork_serves(
    saved: Saved, tmp_path: Path
) -> None:
    """`cicada pool --preload PKG` imports transformers and the model's class before any
    demand (what a forked worker would otherwise pay, ~2.5 s); its fork serves the package."""
    from cicada.common.launch import PoolLauncher, WorkerSpec, pool_call
    from cicada.common.protocol import Dispatch, Ready, Result, Status
    from cicada.testing import StandInCoordinator

    socket_path = str(tmp_path / "pool.sock")
    launcher = PoolLauncher(socket_path, preload=[str(saved.by_dir)]).start(timeout=120)
    stand_in = StandInCoordinator(heartbeat=1.0)  # see tests/integration/test_chaos.py
    try:
        preloaded = pool_call(socket_path, {"op": "ping"})["preloaded"]
        assert "transformers" in preloaded
        assert "transformers.models.gpt2.modeling_gpt2" in preloaded
        launcher.launch(WorkerSpec(model="hub", package=str(saved.by_dir), name="hub-1",
                                   coordinator=f"tcp://127.0.0.1:{stand_in.port}", threads=1,
                                   heartbeat=1.0))  # fmt: skip
        until = time.monotonic() + 120
        stand_in.expect(Ready, until)
        stand_in.send(Dispatch(id="d", model="hub", inputs=[saved.x.numpy()]))
        result = stand_in.expect(Result, until, where=lambda m: m.id == "d")
        assert result.status is Status.OK, result.error
        assert torch.equal(torch.from_numpy(result.outputs[0]), saved.expected)
    finally:
        stand_in.close()
        launcher.close()


def test_export_edge_makes_a_smaller_variant_with_the_same_signature(
    saved: Saved, tmp_path: Path
) -> None:
    """`cicada export-edge` on a transformers package: a quarter of the layers, eager
    attention, same input and output shapes as the package (checked against torch in the
    export itself), so the edge can answer what the cloud answers."""
    from cicada.edge.onnx_model import EdgeModel

    result = _cli("export-edge", "--package", saved.by_dir, "--out", tmp_path / "edge")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "edge" / "edge_model.json").read_text())
    layers = max(1, saved.layers // 4)
    assert info["variant"] == f"hub-edge-L{layers}"
    assert info["edge_config"]["attn_implementation"] == "eager"
    out = EdgeModel.load(tmp_path / "edge").run([saved.x.numpy()])[0]
    assert out.shape == tuple(saved.expected.shape) and out.dtype == np.float32
