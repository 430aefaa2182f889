"""Export and tracing of patched models at a fixed density: torch.onnx.export (dynamo=True, and
the legacy exporter) to standard ONNX ops that ONNX Runtime runs, torch.export.export to aten
ops, torch.jit.trace to a TorchScript graph without sparse_ops ops; mass mode, torch.jit.script
and FX symbolic tracing refused with an ExportError. Tiny models: an ONNX export takes seconds."""
import copy
import io

import pytest
import torch

timm = pytest.importorskip("timm")
import sparse_ops  # noqa: E402
from sparse_ops import ExportError  # noqa: E402


def _tiny(family: str):
    """(dense timm model, patched copy pruning at a fixed density, an image batch shape)."""
    if family == "vit":
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=48,
                                  num_heads=3, num_classes=10)
        patch = lambda m: sparse_ops.patch.vit(m, keep_rate=0.5)  # noqa: E731
    elif family == "vit_avg":  # no class token: scores from the attention received
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=48,
                                  num_heads=3, num_classes=10, class_token=False, global_pool="avg")
        patch = lambda m: sparse_ops.patch.vit(m, keep_rate=0.5)  # noqa: E731
    elif family == "eva":
        model = timm.create_model("eva02_tiny_patch14_224", img_size=28, patch_size=7, depth=3, embed_dim=48,
                                  num_heads=3, num_classes=10)
        patch = lambda m: sparse_ops.patch.eva(m, keep_rate=0.5)  # noqa: E731
    elif family == "sam":  # SAM's windowed encoder: a 5x5 map in padded windows of 2, decomposed rel-pos
        from timm.models.vision_transformer_sam import VisionTransformerSAM
        model = VisionTransformerSAM(img_size=40, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=2,
                                     global_attn_indexes=(2,), use_rel_pos=True, neck_chans=16, num_classes=10)
        for table in (t for name, t in model.named_parameters() if "rel_pos" in name):
            torch.nn.init.normal_(table)  # (timm's zeros)
        patch = lambda m: sparse_ops.patch.sam(m, ratios=0.5)  # noqa: E731
    else:  # swin: shifted windows, per-stage ratios
        model = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7, depths=(2, 2),
                                  num_heads=(2, 4), embed_dim=32, num_classes=10)
        patch = lambda m: sparse_ops.patch.swin(m, ratios=[0.5, 0.25])  # noqa: E731
    torch.nn.init.normal_(getattr(model.get_classifier(), "fc", model.get_classifier()).weight)  # logits of order 1, not timm's near-zero init
    model.eval()
    return model, patch(copy.deepcopy(model)), (2, 3, *model.patch_embed.img_size)


def _assert_matches(out, ref, what):
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{what} is off the eager model by {err}"


@pytest.fixture(scope="module", params=["vit", "vit_avg", "eva", "swin", "sam"])
def models(request):
    torch.manual_seed(0)
    dense, pruned, shape = _tiny(request.param)
    # a fresh input for checking, other than the one traced: nothing of the data may be baked in
    x, x_check = torch.randn(shape), torch.randn(shape)
    with torch.no_grad():
        ref, dense_ref = pruned(x_check), dense(x_check)
    assert (ref - dense_ref).abs().max() > 1e-3, "the patched model must prune (differ from the dense one)"
    return request.param, pruned, x, x_check, ref


# (vit_avg: as vit in ONNX, 11 s; sam: timm's own dense SAM does not convert, its Attention calls a 3-D SDPA
# that onnxscript (0.7.2) refuses: "only 4D query, key, and value are supported")
@pytest.mark.parametrize("models", ["vit", "eva", "swin"], indirect=True)
def test_onnx_export_runs_in_onnxruntime(models):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    family, model, x, x_check, ref = models
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    proto = program.model_proto
    domains = {node.domain for node in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= {"", "ai.onnx"}, f"{family}: custom ONNX domains {domains}"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x_check.numpy()})[0]
    _assert_matches(torch.from_numpy(out), ref, f"{family} in ONNX Runtime")


def _foreign_ops(names):
    return sorted({n for n in names if "sparse_ops" in n or "mkldnn" in n})


def test_torch_export_gives_standard_ops(models):
    family, model, x, x_check, ref = models
    program = torch.export.export(model, (x,))
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not _foreign_ops(ops), f"{family}: the exported graph calls {_foreign_ops(ops)}"
    _assert_matches(program.module()(x_check), ref, f"{family}'s exported program")


def test_jit_trace_loads_without_sparse_ops_ops(models):
    """Traced under no_grad, where eager inference takes the oneDNN packed weights and the ops'
    direct calls: the trace holds none of them, so the saved file needs no sparse_ops to load."""
    family, model, x, x_check, ref = models
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
    ops = [node.kind() for node in traced.inlined_graph.nodes()]
    assert not _foreign_ops(ops), f"{family}: the trace calls {_foreign_ops(ops)}"
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    with torch.no_grad():
        _assert_matches(torch.jit.load(buffer)(x_check), ref, f"{family}'s TorchScript trace")


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_legacy_onnx_export(family, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(1)
    _, model, shape = _tiny(family)
    x, x_check = torch.randn(shape), torch.randn(shape)
    path = str(tmp_path / "model.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (x,), path, dynamo=False)
        ref = model(x_check)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x_check.numpy()})[0]
    _assert_matches(torch.from_numpy(out), ref, f"{family} (legacy exporter) in ONNX Runtime")


def test_mass_mode_is_refused():
    torch.manual_seed(2)
    _, model, shape = _tiny("vit")
    sparse_ops.set_sparsity(model, mass=0.7)
    x = torch.randn(shape)
    with torch.no_grad():
        model(x)  # eager mass mode runs
        with pytest.raises(ExportError, match="by mass"):
            torch.export.export(model, (x,))
        with pytest.raises(ExportError, match="by mass"):
            torch.jit.trace(model, (x,))


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_script_and_fx_are_refused(family):
    _, model, _ = _tiny(family)
    with pytest.raises(ExportError, match="torch.jit.script cannot compile"):
        torch.jit.script(model)
    with pytest.raises(ExportError, match="torch.fx.symbolic_trace cannot trace"):
        torch.fx.symbolic_trace(model)


class _Attend(torch.nn.Module):
    def __init__(self, max_seqlen: int):
        super().__init__()
        self.max_seqlen = max_seqlen

    def forward(self, q, k, v, cu_seqlens):
        return sparse_ops.varlen_attention(q, k, v, cu_seqlens, self.max_seqlen, return_cls_attn=True)


def test_varlen_attention_exports_at_equal_lengths_only():
    """The public op exports where every sequence has max_seqlen rows (a fixed keep rate);
    unequal lengths would make the graph's shapes depend on cu_seqlens' values."""
    q, k, v = torch.randn(3, 10, 2, 8).unbind(0)
    equal = torch.tensor([0, 5, 10], dtype=torch.int32)
    program = torch.export.export(_Attend(5), (q, k, v, equal))
    assert not _foreign_ops(str(node.target) for node in program.graph.nodes)
    q, k, v = torch.randn(3, 10, 2, 8).unbind(0)
    for got, want in zip(program.module()(q, k, v, equal), _Attend(5)(q, k, v, equal)):
        _assert_matches(got, want, "exported varlen_attention")
    with pytest.raises(ExportError, match="unequal lengths"):
        torch.export.export(_Attend(6), (q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32)))
