"""The "why not just fine-tune?" reference: train the base model's body.

Explained in ``notebooks/03_train_memory_decoder.ipynb``.  A fresh copy of
the base model is loaded (the caller's frozen model is untouched), its token
embeddings -- tied to the output head in Gemma -- stay frozen, and every
other weight trains with AdamW on the same training windows that fill the
datastore.  On two CPU cores this is slow (tens of tokens per second), so
``max_tokens`` or ``max_seconds`` cap the budget, and
``benchmarks/bench_finetune.py`` records
the figures that the notebook shows.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .hidden import body, plan_windows, tokenize
from .validate import check_float, check_int


def causal_lm_loss(model, input_ids, attention_mask, labels, chunk: int = 512):
    """Mean next-token cross-entropy, with the LM head run on labelled positions only.

    Equal to ``model(..., labels=labels).loss`` (labels aligned with
    ``input_ids``, ``-100`` = not scored), but cheaper: Gemma's head is
    262,144 columns wide, so it is applied only where a label exists (the
    overlap context of a window has none) and in chunks of ``chunk`` rows, which
    keeps the float32 logits of one chunk, not of the whole batch, in flight.
    """
    h = body(model)(input_ids=input_ids, attention_mask=attention_mask,
                    use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    h, target = h[:, :-1][keep], target[keep]
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    total = h.new_zeros((), dtype=torch.float32)
    for c in range(0, len(target), chunk):
        logits = head(h[c:c + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total = total + torch.nn.functional.cross_entropy(logits, target[c:c + chunk],
                                                          reduction="sum")
    return total / max(len(target), 1)


def training_windows(tokenizer, texts, window: int = 256, overlap: int = 64):
    """Token windows ``(ids, first_target)`` covering every training target once."""
    bos = tokenizer.bos_token_id
    out = []
    for ids in tokenize(tokenizer, texts):
        prepend = bos is not None and ids and ids[0] == bos
        for s, e, first in plan_windows(len(ids), window, overlap, prepend):
            row = ([bos] if prepend and s > 0 else []) + ids[s:e]
            out.append((row, first - s + (1 if prepend and s > 0 else 0)))
    return out


def finetune_body(model, tokenizer, texts, *, epochs: int = 1, lr: float = 5e-5,
                  window: int = 256, overlap: int = 64, batch_size: int = 4,
                  max_tokens: int | None = None, max_seconds: float | None = None,
                  seed: int = 0, progress: bool = True,
                  evaluate=None, eval_every: int | None = None) -> dict:
    """Fine-tune ``model`` in place (embeddings frozen); returns cost figures.

    Only targets that the datastore also stores count in the loss (the
    overlap context of a window is not scored twice).  With ``evaluate`` (a
    function of the model returning a number, e.g. held-out perplexity) and
    ``eval_every`` batches, ``stats["curve"]`` holds ``(tokens, seconds, value)``
    rows; evaluation time is not counted in ``seconds``.
    """
    epochs = check_int("epochs", epochs, 1, example=1)
    batch_size = check_int("batch_size", batch_size, 1, example=4)
    seed = check_int("seed", seed, example=0)
    lr = check_float("lr", lr, example=5e-5)
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}. Pass e.g. lr=5e-5.")
    torch.manual_seed(seed)
    model.train()
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    windows = training_windows(tokenizer, texts, window, overlap)
    order = np.random.default_rng(seed).permutation(len(windows))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    seen, losses, curve, tic = 0, [], [], time.perf_counter()
    paused = 0.0  # time spent evaluating, excluded from the training time
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)] * epochs
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="fine-tuning", unit="batch")
    for batch in batches:
        rows = [windows[i] for i in batch]
        width = max(len(r) for r, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (row, first) in enumerate(rows):
            ids[j, :len(row)] = torch.tensor(row)
            mask[j, :len(row)] = 1
            labels[j, first:len(row)] = torch.tensor(row[first:])
        loss = causal_lm_loss(model, ids.to(device), mask.to(device), labels.to(device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError("fine-tuning loss is NaN/inf; lower lr and retry.")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        seen += int((labels != -100).sum())
        if evaluate is not None and eval_every and len(losses) % eval_every == 0:
            t0 = time.perf_counter()
            model.eval()
            with torch.no_grad():
                value = float(evaluate(model))
            model.train()
            curve.append((seen, t0 - tic - paused, value))
            paused += time.perf_counter() - t0
        if (max_tokens and seen >= max_tokens) or (
                max_seconds and time.perf_counter() - tic - paused >= max_seconds):
            break
    seconds = time.perf_counter() - tic - paused
    model.eval().requires_grad_(False)
    return {"trained_tokens": seen, "seconds": seconds, "tokens_per_second": seen / seconds,
            "losses": losses, "curve": curve,
            "trainable_params": sum(p.numel() for p in params)}


def finetune_report(stats: dict | None, source: str | None, *, base_ppl: float,
                    memdec_ppl: float, knn_ppl: float, train_seconds: float,
                    decoder_params: int):
    """Notebook 03, section 7: the fine-tuning figures beside this run's decoder.

    ``stats`` as ``benchmarks/bench_finetune.py`` saves them (or ``None``:
    says how to make them); ``source`` says where they came from.  Prints the
    table and returns the figure of test perplexity against training time
    (``None`` without figures).  The decoder's point and the kNN-LM's line are
    drawn only when both runs scored the same test tokens.
    """
    if stats is None:
        print("No fine-tuning figures: run `python benchmarks/bench_finetune.py --full "
              "--eval-every 44` or set RUN_FINETUNE = True.")
        return None
    import matplotlib.pyplot as plt

    machine = stats.get("machine", {})
    print(f"fine-tuning figures from {source}\nmeasured on {machine.get('cpu', 'this machine')}, "
          f"{machine.get('threads', '?')} threads, {machine.get('date', '')}\n")
    # comparable only when both were scored on the same test tokens (not in a smoke run)
    same_test = abs(base_ppl / stats["base_ppl"] - 1) < 1e-3
    rows = [("base model", stats["base_ppl"], 0.0, "-"),
            (f"fine-tuned body ({stats['epoch_fraction']:.0%} of an epoch)", stats["finetune_ppl"],
             stats["seconds"], f"{stats['trainable_params'] / 1e6:.0f}M, all of the base body")]
    if not same_test:
        rows.append(("base model, this run's test tokens", base_ppl, 0.0, "-"))
    rows.append(("MemoryDecoder (this run)", memdec_ppl, train_seconds,
                 f"{decoder_params / 1e6:.1f}M, base untouched"))
    print(f"{'':38}{'test ppl':>9}{'training':>11}   trained weights")
    for name, ppl, secs, what in rows:
        print(f"{name:38}{ppl:9.2f}{secs / 60:9.1f} min   {what}")
    if not same_test:
        print("(this run scored other test tokens than the fine-tuning run, as the quick and "
              "smoke sizes do: compare each with its own base row)")
    if "offdomain_finetune_ppl" in stats:
        print(f"\noff-domain test text (notebook 04): base {stats['offdomain_base_ppl']:.2f}, "
              f"fine-tuned {stats['offdomain_finetune_ppl']:.2f} "
              f"({stats['offdomain_finetune_ppl'] / stats['offdomain_base_ppl'] - 1:+.1%})")

    curve = [(0.0, stats["base_ppl"])] + [(c["seconds"] / 60, c["test_ppl"])
                                          for c in stats["curve"]]
    if not stats["curve"] or stats["curve"][-1]["trained_tokens"] < stats["trained_tokens"]:
        curve.append((stats["seconds"] / 60, stats["finetune_ppl"]))  # the end of training
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(*zip(*curve), marker="o", label="fine-tuning the body")
    if same_test:
        ax.scatter([train_seconds / 60], [memdec_ppl], color="C2", marker="*", s=180,
                   zorder=3, label="MemoryDecoder (this run)")
        ax.axhline(knn_ppl, color="C1", ls="--", label="kNN-LM (search every token)")
    ax.set(xlabel="training time (min; datastore and targets not counted)",
           ylabel="test perplexity", title="How much training time buys how much perplexity?")
    ax.legend(fontsize=8)
    return fig
