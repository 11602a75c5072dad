"""Token reduction: a pruning method at prefill on a decoder, or in an encoder, end to end on an architecture.

The check applies FastV as a user would (``prunekit.tokens.apply``) to a padded batch and verifies what the
patch promises:

- the reduced forward runs, its outputs are finite, and tokens were really removed (the patch's trace);
- the first and last real tokens and a token id the user protects are kept;
- the result is right: it equals the unpatched model in which the removed tokens are hidden from every
  later block (an attention mask, with positions left alone), at every kept position. This checks that
  positions, rotary tables and masks follow the kept tokens, independently of how the patch does it;
- decoders: greedy decoding after the pruned prefill (token by token on the cache, and ``generate``) gives
  what that same reference gives for the prompt and the generated tokens;
- encoders: ToMe merges and the merged tokens' sizes add up to the real tokens;
- a ratio of 0 gives the unpatched outputs bit for bit (so reading the attention changes nothing), and
  removing the patch restores them bit for bit.

A refusal (a ``PrunekitError`` from the library) is reported with its one line.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.tools.support import ModelFactory, SupportResult, cache_keyword, one_line

RATIO = 0.5
PADDING = 4  # the second sequence is shorter by this many tokens (left-padded in decoders, right in encoders)
PROMPT = 24  # tokens per prompt: longer than the tiny models' sliding windows, so windows are exercised
NEW_TOKENS = 3
TOLERANCE = 1e-4


def _reducing_layer(depth: int) -> int:
    """Reduce after the first block, so that every later block runs on the kept tokens."""
    return 0 if depth > 1 else depth - 1


def _batch(windows: torch.Tensor, causal: bool, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if windows.shape[0] < 2 or windows.shape[1] < PROMPT + NEW_TOKENS:
        raise ValueError(f"the token check needs 2 windows of at least {PROMPT + NEW_TOKENS} tokens")
    ids = windows[:2, :PROMPT].clone()
    mask = torch.ones_like(ids)
    pad = slice(0, PADDING) if causal else slice(PROMPT - PADDING, PROMPT)
    ids[1, pad] = pad_id
    mask[1, pad] = 0
    return ids, mask


class HideRemoved:
    """Forward pre-hooks on the blocks after the reducing one that hide the removed tokens as keys, on top of
    the model's own mask (causal, window, padding): the unpatched model's version of the pruned forward."""

    def __init__(self, model: nn.Module, first_block: int, keep_keys: torch.Tensor, causal: bool):
        from prunekit.models import adapter_for

        self.keep_keys = keep_keys  # (batch, tokens) bool over the full sequence
        self.causal = causal
        self.handles = [block.register_forward_pre_hook(self._hook(block), with_kwargs=True)
                        for block in list(adapter_for(model).blocks())[first_block:]]

    def _hook(self, block: nn.Module) -> Callable[..., Any]:
        from prunekit.models.block_call import BlockCall

        signature = inspect.signature(block.forward)

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            call = BlockCall.bind(signature, args, kwargs)
            hidden = call.hidden
            queries, keys = hidden.shape[1], self.keep_keys.shape[1]
            low = torch.finfo(hidden.dtype).min
            mask = call.mask
            if mask is None:
                allowed = torch.ones(queries, keys, dtype=torch.bool, device=hidden.device)
                if self.causal:
                    allowed = allowed.tril(keys - queries)
                base = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, low)[None, None]
            elif mask.dtype == torch.bool:
                base = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(~mask, low)
            else:
                base = mask.to(hidden.dtype)
            hidden_keys = ~self.keep_keys[:, None, None, -base.shape[-1]:]
            return (hidden,), {**call.with_mask(base.masked_fill(hidden_keys, low)).arguments}

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _compare(name: str, got: torch.Tensor, expected: torch.Tensor) -> str | None:
    if not torch.isfinite(got).all():
        return f"{name}: the reduced outputs are not finite"
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE):
        worst = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        return f"{name}: differs from the unpatched model with the removed tokens hidden (max {worst:.2e})"
    return None


def _kept_problem(patch, mask: torch.Tensor, protected_at: int, layer: int) -> str | None:
    """Tokens were removed at ``layer``, the protected ones are kept, and each sequence lost its share."""
    steps = patch.trace.steps
    if not steps or steps[0].layer != layer or not steps[0].tokens_after < steps[0].tokens_before:
        return f"no tokens were removed at block {layer} (trace: {patch.trace.to_dict()})"
    kept = patch.kept_positions()
    for row in range(mask.shape[0]):
        real = mask[row].nonzero()[:, 0].tolist()
        positions = set(kept[row][kept[row] >= 0].tolist())
        required = {real[0], real[-1]} | ({protected_at} if row == 0 else set())
        if not required <= positions:
            return f"sequence {row} lost protected tokens {sorted(required - positions)}"
        if not positions <= set(real):
            return f"sequence {row} kept padding in place of a real token"
    return None


def _with_cache(model: nn.Module, output: Any) -> dict[str, Any]:
    """The cache of ``output`` as the keyword ``model`` takes it: ``cache`` in newer transformers 5.x,
    ``past_key_values`` before."""
    cache = output.get("cache") if output.get("cache") is not None else output.get("past_key_values")
    return {cache_keyword(model): cache}


def _greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding on the cache, token by token: the new tokens and the logits that chose each."""
    output = model(input_ids=ids, attention_mask=mask, use_cache=True)
    logits = [output.logits[:, -1]]
    tokens = []
    for _ in range(NEW_TOKENS):
        token = logits[-1].argmax(-1, keepdim=True)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        output = model(input_ids=token, attention_mask=mask, use_cache=True, **_with_cache(model, output))
        logits.append(output.logits[:, -1])
    return torch.cat(tokens, dim=1), torch.stack(logits[:-1], dim=1)


def _check_decoder(model: nn.Module, windows: torch.Tensor, depth: int) -> SupportResult:
    from prunekit.tokens import apply

    pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    ids, mask = _batch(windows, True, pad_id)
    layer = _reducing_layer(depth)
    protected_at = 5
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        patch = apply(model, "fastv", ratio=RATIO, layers=[layer], protect_ids=[int(ids[0, protected_at])])
        try:
            reduced = model(input_ids=ids, attention_mask=mask).logits
            problem = _kept_problem(patch, mask, protected_at, layer)
            if problem:
                return SupportResult("broken", problem)
            kept = patch.kept_positions().clone()
            tokens, step_logits = _greedy(model, ids, mask)
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                       do_sample=False, pad_token_id=pad_id)
        finally:
            patch.remove()
        # generate() numbers the left-padded sequence's positions from its padding mask, greedy decoding here
        # from the start of the row (as the reference does): only the unpadded sequence must agree exactly.
        if not torch.equal(generated[0, PROMPT:], tokens[0]):
            return SupportResult("broken", "generate() after the pruned prefill differs from greedy decoding on its "
                                           "cache")
        keep_keys = torch.zeros(2, PROMPT + NEW_TOKENS, dtype=torch.bool)
        keep_keys[:, PROMPT:] = True
        for row in range(2):
            keep_keys[row, kept[row][kept[row] >= 0]] = True
        full = torch.cat([ids, tokens], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        reference = HideRemoved(model, layer + 1, keep_keys, causal=True)
        try:
            expected = model(input_ids=full, attention_mask=full_mask).logits
        finally:
            reference.remove()
        valid = kept >= 0
        for row in range(2):
            positions = kept[row][valid[row]]
            problem = _compare(f"prefill, sequence {row}", reduced[row][valid[row]], expected[row, positions])
            if problem:
                return SupportResult("broken", problem)
        problem = _compare("decoding", step_logits, expected[:, PROMPT - 1:PROMPT - 1 + NEW_TOKENS])
        if problem:
            return SupportResult("broken", problem)
        exact = _exactness(model, lambda: model(input_ids=ids, attention_mask=mask).logits, dense, depth)
        if exact:
            return SupportResult("broken", exact)
    kept_share = float(valid.sum()) / float(mask.sum())
    return SupportResult("yes", f"fastv at block {layer}: {kept_share:.0%} of the prompt kept, decoding checked")


def _check_encoder(model: nn.Module, windows: torch.Tensor, depth: int) -> SupportResult:
    from prunekit.tokens import apply

    ids, mask = _batch(windows, False, 0)
    layer = _reducing_layer(depth)
    protected_at = 5

    def run() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    with torch.no_grad():
        dense = run()
        patch = apply(model, "fastv", ratio=RATIO, layers=[layer], protect_ids=[int(ids[0, protected_at])])
        try:
            reduced = run()
            problem = _kept_problem(patch, mask, protected_at, layer)
            if problem:
                return SupportResult("broken", problem)
            kept = patch.kept_positions().clone()
        finally:
            patch.remove()
        keep_keys = torch.zeros(2, PROMPT, dtype=torch.bool)
        for row in range(2):
            keep_keys[row, kept[row][kept[row] >= 0]] = True
        reference = HideRemoved(model, layer + 1, keep_keys & mask.bool(), causal=False)
        try:
            expected = run()
        finally:
            reference.remove()
        for row in range(2):
            positions = kept[row][kept[row] >= 0]
            problem = _compare(f"sequence {row}", reduced[row, :len(positions)], expected[row, positions])
            if problem:
                return SupportResult("broken", problem)
        with apply(model, "tome", ratio=0.3) as merging:
            merged = run()
            sizes = merging.state.sizes.sum(dim=1)
        if not torch.isfinite(merged).all() or sizes.tolist() != mask.sum(dim=1).float().tolist():
            return SupportResult("broken", "tome: outputs not finite, or merged sizes do not add up to the real tokens")
        exact = _exactness(model, run, dense, depth)
        if exact:
            return SupportResult("broken", exact)
    return SupportResult("yes", f"fastv at block {layer} and tome, checked")


def _exactness(model: nn.Module, run: Callable[[], torch.Tensor], dense: torch.Tensor, depth: int) -> str | None:
    from prunekit.tokens import apply

    with apply(model, "fastv", rate=0.0, layers=list(range(depth))):
        if not torch.equal(run(), dense):
            return "a rate of 0 does not give the unpatched outputs bit for bit"
    if not torch.equal(run(), dense):
        return "removing the patch does not restore the unpatched outputs bit for bit"
    return None


def check(factory: ModelFactory, windows: torch.Tensor) -> SupportResult:
    """Token reduction on a fresh model from ``factory``: FastV at prefill (decoders) or in an encoder.

    ``windows`` (token ids, samples × length, at least 2 × 27) give the prompts.
    """
    from prunekit.tokens import find_family

    model = factory().eval()
    try:
        family = find_family(model)
        causal = family.causal
        depth = family.depth
        if causal:
            return _check_decoder(model, windows, depth)
        return _check_encoder(model, windows, depth)
    except PrunekitError as exc:
        return SupportResult("refused", one_line(exc))
