"""CPU memory/speed measures of issue 6: fused AdamW, the in-place chunked LM head, glibc's mmap
threshold. Each must leave the numbers as they were (within float rounding)."""

import sys
from types import SimpleNamespace

import pytest
import torch

from prefopt.modeling.lm_head import ChunkedHeadLogps, _exp_shifted_, head_chunk_size
from prefopt.training.optim import build_optimizer, fused_adamw_ok


def test_inplace_logsumexp_matches_torch_including_inf_rows():
    torch.manual_seed(0)
    x = torch.randn(5, 97) * 30
    x[2] = float("-inf")  # a fully masked row stays -inf (torch.logsumexp's answer), not NaN
    x[3, :50] = float("-inf")
    want = torch.logsumexp(x, -1)
    sums, shift = _exp_shifted_(x.clone())  # the head's in-place exp: logsumexp = log(sums) + shift
    got = sums.log() + shift
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got[2] == float("-inf")


def test_head_chunk_size_bounds_the_logits_block():
    assert head_chunk_size(50257) == (1 << 24) // 50257 == 333
    assert head_chunk_size(151936) == 110
    assert head_chunk_size(10**9) == 16  # never fewer than 16 tokens per chunk
    assert head_chunk_size(11) * 11 <= 1 << 24


@pytest.mark.parametrize("keep_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the reused logits buffer
@pytest.mark.parametrize("n_tokens", [0, 1, 6, 7])  # chunks of 2: none, one partial, 3 full, 3 + partial
def test_chunked_head_gradients_with_and_without_targets(n_tokens, dtype, bias, keep_last):
    torch.manual_seed(1)
    h = torch.randn(n_tokens, 4, dtype=dtype, requires_grad=True)
    w = torch.randn(11, 4, dtype=dtype, requires_grad=True)
    b = torch.randn(11, dtype=dtype, requires_grad=True) if bias else None
    tokens = torch.randint(0, 11, (n_tokens,))
    got = ChunkedHeadLogps.apply(h, w, b, tokens, 2, keep_last)
    logits = h.double() @ w.double().T + (b.double() if bias else 0)
    want = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got.double(), want, **tol)
    g = torch.randn(n_tokens, dtype=torch.float64)
    params = (h, w, b) if bias else (h, w)
    def extra():  # so every parameter gets a gradient, also with no targets
        return sum(0 * p.sum() for p in params[1:])

    grads = torch.autograd.grad((got.double() * g).sum() + extra(), params)
    want_grads = torch.autograd.grad((want * g).sum() + extra(), params)
    for a, e in zip(grads, want_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e.double(), **tol)
    if n_tokens == 0:
        assert not any(x.any() for x in grads[1:])


PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_")


def test_chunked_head_keeps_the_last_chunk_only_when_asked():
    """keep_last: the forward leaves the last chunk's softmax for the backward, which then
    recomputes one chunk fewer (counted through the product it runs)."""
    torch.manual_seed(2)
    h = torch.randn(7, 4, requires_grad=True)
    w = torch.randn(11, 4, requires_grad=True)
    tokens = torch.randint(0, 11, (7,))
    products = {}
    for keep_last in (False, True):
        out = ChunkedHeadLogps.apply(h, w, None, tokens, 3, keep_last)
        with torch.profiler.profile() as prof:
            out.sum().backward()
        products[keep_last] = sum(e.count for e in prof.key_averages() if e.key in PRODUCTS)
    # 3 chunks; per chunk grad_h and grad_w products (2), plus the recomputation of the logits.
    assert products[False] == 3 * 3
    assert products[True] == 3 * 3 - 1


def test_fused_adamw_is_used_on_cpu_and_matches_the_loop():
    cfg = SimpleNamespace(optimizer="adamw", learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999,
                          adam_epsilon=1e-8, weight_decay=0.1)
    torch.manual_seed(0)
    a = [torch.randn(13, 7, requires_grad=True), torch.randn(7, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    fused = build_optimizer(cfg, a)
    assert fused.param_groups[0]["fused"] is True
    loop = torch.optim.AdamW(b, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(4):
        for p, q in zip(a, b):
            grad = torch.randn_like(p)
            p.grad, q.grad = grad.clone(), grad.clone()
        fused.step()
        loop.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert not torch.equal(p, torch.zeros_like(p))


def test_fused_adamw_only_for_floating_params_on_one_device():
    assert fused_adamw_ok([torch.zeros(2), torch.zeros(3)])
    assert not fused_adamw_ok([])
    assert not fused_adamw_ok([torch.zeros(2, dtype=torch.long)])
    assert not fused_adamw_ok([torch.zeros(2), torch.zeros(2, device="meta")])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_return_freed_memory_sets_glibc_threshold():
    import platform

    from prefopt.memory import return_freed_memory

    ok = return_freed_memory(1 << 20)
    assert ok == (platform.libc_ver()[0] == "glibc")


def test_transient_heap_raises_the_mmap_threshold_for_its_block_only(monkeypatch):
    from prefopt import memory

    calls = []

    def fake_mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setitem(memory._state, "mallopt", None)
    with memory.transient_heap():  # return_freed_memory not in effect: nothing to change
        pass
    assert calls == []
    monkeypatch.setattr(memory, "_mallopt", lambda: fake_mallopt)
    assert memory.return_freed_memory(1 << 20)
    assert calls == [(memory.M_MMAP_THRESHOLD, 1 << 20), (memory.M_TRIM_THRESHOLD, 1 << 30)]
    calls.clear()
    with pytest.raises(RuntimeError), memory.transient_heap():
        with memory.transient_heap():  # nested: changes nothing more, restores nothing early
            pass
        assert calls == [(memory.M_MMAP_THRESHOLD, 32 << 20)]
        raise RuntimeError("the threshold comes back also when the block fails")
    assert calls == [(memory.M_MMAP_THRESHOLD, 32 << 20), (memory.M_MMAP_THRESHOLD, 1 << 20)]


# ------------------------------------------------------------------------------------------------
# The tied embedding/LM-head weight's gradient accumulated in place (selective.accumulate_tied_grad_in_place)


def _tied_gpt2(seed=0):
    from prefopt.toy import tiny_gpt2_config

    torch.manual_seed(seed)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(tiny_gpt2_config(40, n_embd=32)).eval()  # no dropout: runs comparable
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return model


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    rows, length, targets = 2, 9, 7
    return {"input_ids": torch.randint(4, 40, (rows, length), generator=g),
            "attention_mask": torch.ones(rows, length, dtype=torch.long),
            "target_rows": torch.tensor([0, 0, 0, 1, 1, 1, 1]), "target_positions": torch.tensor([2, 3, 4, 1, 5, 6, 7]),
            "target_tokens": torch.randint(4, 40, (targets,), generator=g)}


def test_tied_gradient_in_place_equals_autograd_over_accumulated_backwards():
    from prefopt.modeling.lm_head import IN_PLACE_GRAD, accumulate_tied_grad_in_place
    from prefopt.modeling.logprobs import target_token_logps

    plain, fused = _tied_gpt2(), _tied_gpt2()
    handle = accumulate_tied_grad_in_place(fused)
    weight = fused.get_input_embeddings().weight
    assert handle.weight is weight and fused.get_input_embeddings().sparse
    buffer = weight.grad
    assert accumulate_tied_grad_in_place(plain.transformer.wte) is None  # not a whole causal LM
    for seed in (1, 2):  # two micro-batches: the gradient accumulates
        for model in (plain, fused):
            logps = target_token_logps(model, _batch(seed), chunk_size=3)
            (logps * torch.linspace(-1, 2, len(logps))).sum().backward()
    assert weight.grad is buffer and not buffer.is_sparse  # accumulated in place, still dense
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert weight.grad.abs().sum() > 0
    handle.zero()
    assert weight.grad is buffer and not buffer.any()
    # Released: plain autograd again (torch.autograd.grad sees the whole gradient).
    handle.release()
    assert weight.grad is None and not fused.get_input_embeddings().sparse and not hasattr(weight, IN_PLACE_GRAD)
    want, got = (torch.autograd.grad(target_token_logps(m, _batch(1), chunk_size=3).sum(), m.transformer.wte.weight)[0]
                 for m in (plain, fused))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_untied_or_frozen_heads_are_left_alone(tiny_llama):
    from prefopt.modeling.lm_head import accumulate_tied_grad_in_place
    from prefopt.modeling.load import load_causal_lm

    untied = load_causal_lm(str(tiny_llama))
    assert accumulate_tied_grad_in_place(untied) is None
    assert not untied.get_input_embeddings().sparse and untied.lm_head.weight.grad is None
    frozen = _tied_gpt2()
    frozen.requires_grad_(False)
    assert accumulate_tied_grad_in_place(frozen) is None


def test_training_with_the_in_place_tied_gradient_matches_plain_autograd(tiny_gpt2, easy_data, tmp_path, monkeypatch):
    """Same losses, gradient norms and final weights over steps with gradient accumulation."""
    from safetensors.torch import load_file

    from prefopt import recipes
    from prefopt.config import TrainConfig
    from prefopt.training import trainer as train
    from prefopt.training.metrics import read_metrics

    used = []
    real = train.in_place_grads

    def spy(*args):
        out = real(*args)
        used.append(len(out))
        return out

    def run(out, in_place):
        monkeypatch.setattr(train, "in_place_grads", spy if in_place else (lambda *a: []))
        cfg = TrainConfig(model_name_or_path=str(tiny_gpt2), dataset=str(easy_data["train"]), output_dir=str(out),
                          max_steps=3, logging_steps=1, save_steps=0, learning_rate=1e-2, max_grad_norm=0.5,
                          per_device_train_batch_size=4, gradient_accumulation_steps=2, progress_bar=False,
                          report_to="none", max_length=32, max_prompt_length=16)
        recipes.train(cfg)
        return read_metrics(out / "metrics.jsonl"), load_file(out / "model.safetensors")

    plain_rows, plain_w = run(tmp_path / "plain", False)
    fused_rows, fused_w = run(tmp_path / "fused", True)
    assert used == [1]
    for a, b in zip(plain_rows, fused_rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert plain_w.keys() == fused_w.keys()
    for name in plain_w:  # Adam turns float-rounding differences of near-zero gradients into ~1e-6 steps;
        # a gradient that is wrong anywhere moves weights by ~lr = 1e-2
        torch.testing.assert_close(fused_w[name], plain_w[name], rtol=1e-5, atol=2e-5)
    initial = load_file(tiny_gpt2 / "model.safetensors")
    assert not torch.equal(fused_w["transformer.wte.weight"], initial["transformer.wte.weight"])


def test_chunked_head_backward_recomputes_in_the_forwards_autocast_precision():
    """Under bf16 autocast the forward's log-sum-exp comes from bf16 logits; a backward that
    recomputed them in float32 would use a softmax that no longer sums to one. The bias gradient of
    sum(logp) is sum_t (onehot_t - softmax_t), whose total over the vocabulary is then exactly 0."""
    torch.manual_seed(3)
    h = (3 * torch.randn(6, 16)).requires_grad_()
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    tokens = torch.randint(0, 50, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ChunkedHeadLogps.apply(h, w, b, tokens, 2, False)  # three chunks, all recomputed
    out.sum().backward()
    assert abs(float(b.grad.sum())) < 1e-4
    assert float(b.grad.abs().sum()) > 1.0  # not trivially zero
