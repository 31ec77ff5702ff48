"""AttentionMonitor: what it records over an evaluation run, its summary, table and plot."""
import sys

import pytest
import torch
from torch import nn

from entropy_attn import AttentionMonitor, EntropyAttention, replace_attention

E, H = 16, 4


def _model(**options):
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    return replace_attention(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), **options).eval()


def test_records_row_weighted_means_over_calls():
    model = _model()
    batches = [torch.randn(3, 7, E), torch.randn(1, 5, E)]
    pads = [torch.zeros(3, 7, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.bool)]
    pads[0][0, 4:] = True  # 3 padded query rows in the first call
    seen = {name: [] for name in ("layers.0.self_attn", "layers.1.self_attn")}
    with torch.no_grad(), AttentionMonitor(model) as mon:
        for x, pad in zip(batches, pads):
            model(x, src_key_padding_mask=pad)
            for name in seen:
                layer = model.get_submodule(name)
                seen[name].append((layer.last_entropy.clone(), layer._last_rows.clone()))
    summary = mon.summary()
    assert list(summary) == list(seen)
    for name, calls in seen.items():
        assert [r.tolist() for _, r in calls] == [[18.0] * H, [5.0] * H]  # 3*7 - 3 and 1*5 valid rows
        expected = sum(e * r for e, r in calls) / sum(r for _, r in calls)
        torch.testing.assert_close(summary[name]["entropy"], expected)
        assert set(summary[name]) == {"entropy"}  # tau = 0: no pruning stats
    table = mon.table()
    assert "layers.1.self_attn" in table and "entropy" in table


def test_monitor_scope_eval_entropy_only_inside():
    model = _model()
    layer = model.layers[0].self_attn
    x = torch.randn(2, 6, E)
    model(x)
    assert layer.last_entropy is None  # eval, unmonitored: the kernels skip the entropy
    with AttentionMonitor(model):
        model(x)
        assert layer.last_entropy.shape == (H,)
    assert not layer._forward_hooks and layer._monitors == 0
    model(x)
    assert layer.last_entropy is None
    with pytest.raises(ValueError, match="no EntropyAttention"):
        AttentionMonitor(nn.Linear(2, 2))


def test_copies_and_reentry_of_an_active_monitor():
    """A deep copy of a monitored model (an EMA copy) is not monitored: it neither records in eval
    nor adds to the monitor's summary (the copy used to keep the monitor's hook and count). A monitor
    entered twice raises, where its inner exit used to stop the outer recording."""
    import copy

    model = _model()
    x = torch.randn(2, 6, E)
    with torch.no_grad(), AttentionMonitor(model) as mon:
        model(x)
        twin = copy.deepcopy(model)
        twin(torch.randn(2, 6, E) * 10)
        assert twin.layers[0].self_attn.last_entropy is None
        assert not twin.layers[0].self_attn._forward_hooks and twin.layers[0].self_attn._monitors == 0
        with pytest.raises(RuntimeError, match="already active"):
            mon.__enter__()
    with torch.no_grad(), AttentionMonitor(model) as alone:
        model(x)
    for name, values in alone.summary().items():
        torch.testing.assert_close(mon.summary()[name]["entropy"], values["entropy"])


def test_records_pruning_stats_with_tau():
    from entropy_attn.pruned import pruned_attention

    model = _model(tau=0.05)
    layer = model.layers[0].self_attn
    x = torch.randn(2, 40, E)
    with torch.no_grad(), AttentionMonitor(model) as mon:
        model(x)
    dense = _model()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad(), AttentionMonitor(dense) as dense_mon:
        dense(x)
    inp, _ = layer._inputs(x, x, x, True, None, None, False)  # layer 0 sees x itself (post-norm)
    _, stats = pruned_attention(inp.q, inp.k, inp.v, tau=0.05, return_stats=True)
    got = mon.summary()["layers.0.self_attn"]
    assert set(got) == {"entropy", "entry_sparsity", "tile_sparsity", "pruned_mass"}
    for key, value in stats.items():
        torch.testing.assert_close(got[key], value.float())
    assert ((got["entry_sparsity"] > 0) & (got["pruned_mass"] > 0)).all()  # near-uniform rows over 40 keys
    # the entropy is the dense one, measured beside the pruned pass
    torch.testing.assert_close(got["entropy"], dense_mon.summary()["layers.0.self_attn"]["entropy"])


def test_plot_writes_an_image(tmp_path):
    model = _model()
    with AttentionMonitor(model) as mon:
        with pytest.raises(RuntimeError, match="nothing recorded"):
            mon.plot(tmp_path / "empty.png")
        model(torch.randn(2, 6, E))
    path = tmp_path / "entropy.png"
    mon.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    model = _model()
    with AttentionMonitor(model) as mon:
        model(torch.randn(2, 6, E))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'entropy-attn\[plot\]'"):
        mon.plot(tmp_path / "x.png")


def test_monitor_on_a_bare_layer_and_the_weights_path():
    layer = EntropyAttention(E, H).eval()
    x = torch.randn(5, 2, E)
    with AttentionMonitor(layer) as mon:
        layer(x, x, x)  # need_weights=True: materialized path
    assert list(mon.summary()) == ["EntropyAttention"]
    assert mon.summary()["EntropyAttention"]["entropy"].shape == (H,)
