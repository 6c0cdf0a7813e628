"""mindeye-export's ONNX graphs: dynamo export, dynamic batch, external data, parity of ONNX Runtime (float and
int8), torch.compile and TensorRT against eager, and the realtime backend decoding from the graphs."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from export.cli import export_bundle
from export.parity import TOLERANCES, check_parity
from mindeye.bundle import available_backends, load_graphs, read_manifest
from mindeye.errors import ConfigValueError
from mindeye.generator import GenerationSettings, build_pipeline
from mindeye.latents import PixelCodec
from mindeye.models import build_model, save_calibration, save_checkpoint
from realtime.backends import load_backend

VOXELS = {"subj01": 40}
TOKENS, DIM = 16, 32
CLIP_ID = "test-encoder"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, small_generator_cfg):
    """A tiny checkpoint (live calibration) and an 8 px student-shaped generator, random weights."""
    folder = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    model = build_model("tiny", voxels_per_subject=VOXELS, low_level={"latent_channels": 3}).eval()
    save_checkpoint(model, folder / "ckpt")
    rng = np.random.default_rng(1)
    save_calibration(folder / "ckpt", {"subj01": (rng.normal(2, 1, 40).astype(np.float32),
                                                   rng.uniform(0.5, 3, 40).astype(np.float32))},
                     units="percent_signal_change", estimator="realtime_glm")
    pipe = build_pipeline(small_generator_cfg(cross_attention_dim=DIM, time_cond_proj_dim=16), clip_id=CLIP_ID,
                          clip_tokens=TOKENS, sampler="lcm")
    pipe.save_pretrained(folder / "gen")
    return folder / "ckpt", folder / "gen", model


@pytest.fixture(scope="module")
def onnx_bundle(sources, tmp_path_factory):
    checkpoint, generator, _ = sources
    with torch.no_grad():
        return export_bundle(checkpoint, tmp_path_factory.mktemp("bundle") / "ort", clip_id=CLIP_ID,
                             generator=generator, backend="onnxruntime", quantize_int8=True)


def test_every_graph_is_exported_checked_and_hashed_with_a_dynamic_batch(onnx_bundle):
    manifest = onnx_bundle.manifest
    assert sorted(manifest["graphs"]) == ["generator_unet", "heads.subj01", "prior_denoiser"]
    for name, record in manifest["graphs"].items():
        graph = onnx.load(str(onnx_bundle.root / record["file"]))
        onnx.checker.check_model(graph)
        names = [i.name for i in graph.graph.input]
        assert names == [t["name"] for t in manifest["interface"][name]["inputs"]]
        assert {i.type.tensor_type.shape.dim[0].dim_param for i in graph.graph.input} == {"batch"}, name
        assert record["external_data"] == [] and (onnx_bundle.root / record["int8"]["file"]).is_file()
    unet_inputs = [t["name"] for t in manifest["interface"]["generator_unet"]["inputs"]]
    assert unet_inputs == ["sample", "timestep", "tokens", "time_ids", "guidance_embedding"]


def test_export_records_parity_of_onnx_runtime_and_the_measured_cost_of_int8(onnx_bundle):
    parity = onnx_bundle.manifest["parity"]
    float32, int8 = parity["onnxruntime"], parity["onnxruntime-int8"]
    for graph in ("heads.subj01", "prior_denoiser", "generator_unet"):
        assert float32[graph]["passed"] and float32[graph]["relative_error"] < 1e-5
        assert float32[graph]["min_cosine"] > 0.99999
        # int8 weights cost accuracy, measured: far more than float's rounding, within its 10 % budget
        assert 10 * float32[graph]["relative_error"] < int8[graph]["relative_error"] < TOLERANCES["onnxruntime-int8"]
        assert int8[graph]["min_cosine"] > 0.99


def test_onnx_runtime_decodes_as_eager_from_the_same_bundle(onnx_bundle):
    assert available_backends(onnx_bundle) == ["onnxruntime", "eager"]
    kwargs = dict(codec=PixelCodec(8), image_size=16, prior_steps=5, prior_sampler="dpmpp",
                  generation=GenerationSettings(2, 2.0, 0.25))
    ort, eager = load_backend(onnx_bundle.root, "auto", **kwargs), load_backend(onnx_bundle.root, "eager", **kwargs)
    assert (ort.name, eager.name) == ("onnxruntime", "eager")
    x = np.random.default_rng(3).normal(2, 2, (3, 40)).astype(np.float32)
    got, want = ort.decode("subj01", x), eager.decode("subj01", x)
    np.testing.assert_allclose(got.image_tokens_bld, want.image_tokens_bld, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.embedding_norm_b, want.embedding_norm_b, rtol=1e-5)
    assert np.abs(got.lowlevel_bhw3.astype(int) - want.lowlevel_bhw3).max() <= 1
    assert np.abs(got.reconstruction_bhw3.astype(int) - want.reconstruction_bhw3).max() <= 1
    int8 = load_backend(onnx_bundle.root, "onnxruntime", int8=True, **kwargs)
    assert int8.graphs.int8_graphs == ["heads.subj01", "prior_denoiser", "generator_unet"]
    assert not np.allclose(int8.decode("subj01", x).image_tokens_bld, want.image_tokens_bld, atol=1e-4)


def test_a_backend_that_failed_parity_at_export_is_refused(onnx_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(onnx_bundle.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["parity"]["onnxruntime"]["prior_denoiser"]["passed"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigValueError, match=r"onnxruntime failed its parity check against eager at export on "
                                               r"\['prior_denoiser'\]"):
        load_backend(copy, "onnxruntime", with_generator=False)
    assert load_backend(copy, "eager", with_generator=False).name == "eager"


def test_a_graph_over_the_size_limit_keeps_its_weights_in_external_data(sources, tmp_path, monkeypatch):
    import export.onnx_graphs as onnx_graphs
    from mindeye.bundle.graphs import PriorDenoiserGraph

    _, _, model = sources
    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_BYTES", 0)  # the paper-size heads graph's case, at tiny size
    graph = PriorDenoiserGraph(model.prior)
    record = onnx_graphs.export_graph(graph, graph.spec(), tmp_path / "graphs" / "prior_denoiser.onnx")
    assert [d["file"] for d in record["external_data"]] == ["graphs/prior_denoiser.onnx.data"]
    assert (tmp_path / "graphs" / "prior_denoiser.onnx.data").stat().st_size >= record["weight_bytes"]
    proto = onnx.load(str(tmp_path / "graphs" / "prior_denoiser.onnx"), load_external_data=False)
    outside = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert 4 * sum(int(np.prod(t.dims)) for t in outside) >= 0.9 * record["weight_bytes"]  # the weights live outside
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "graphs" / "prior_denoiser.onnx"))
    x, brain = torch.randn(2, TOKENS, DIM), torch.randn(2, TOKENS, DIM)
    t = torch.tensor([3, 70])
    (got,) = session.run(None, {"noisy_tokens": x.numpy(), "timestep": t.numpy(), "brain_tokens": brain.numpy()})
    np.testing.assert_allclose(got, graph(x, t, brain)[0].detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the GPU test below runs it")
def test_without_tensorrt_the_backend_says_what_to_install(onnx_bundle):
    with pytest.raises(ConfigValueError, match=r"needs NVIDIA TensorRT, which is not installed: pip install "
                                               r"'\.\[tensorrt\]' on a GPU host|needs a CUDA GPU"):
        load_graphs(onnx_bundle, "tensorrt", device="cuda")
    assert "tensorrt" not in available_backends(onnx_bundle, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and a CUDA GPU: pip install '.[tensorrt]' on a GPU host")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engines_match_eager_within_their_tolerance(onnx_bundle, precision):
    engines = load_graphs(onnx_bundle, "tensorrt", device="cuda", precision=precision, max_batch=4)
    reference = load_graphs(onnx_bundle, "eager")  # the model's and the generator's graphs
    results = check_parity(onnx_bundle, reference, engines, TOLERANCES[f"tensorrt-{precision}"])
    assert results and all(r.passed for r in results), results
    assert any(p.name.endswith(f".{precision}.b4.engine") for p in (onnx_bundle.root / "engines").iterdir())


@pytest.mark.slow  # torch.compile's inductor takes minutes on this CPU
def test_torch_compile_matches_eager(onnx_bundle):
    compiled = load_graphs(onnx_bundle, "compile")
    results = check_parity(onnx_bundle, load_graphs(onnx_bundle, "eager"), compiled, TOLERANCES["compile"],
                           batches=(2,))
    assert [r.graph for r in results] == ["heads.subj01", "prior_denoiser", "generator_unet"]
    assert all(r.passed for r in results), results


def test_the_command_refuses_an_occupied_out_folder_in_one_line(onnx_bundle, sources):
    checkpoint, _, _ = sources
    done = subprocess.run([sys.executable, "-m", "export.cli", f"checkpoint={checkpoint}",
                           f"out_dir={onnx_bundle.root}", "backend=eager"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]  # mindeye.cli.EXIT_CODES["config"]
    assert done.stderr.strip().splitlines() == [
        f"mindeye-export: out_dir={onnx_bundle.root} holds a bundle already; pass overwrite=true to replace it, "
        "or choose another out_dir"]
    assert read_manifest(onnx_bundle.root).manifest["backend"] == "onnxruntime"  # untouched
