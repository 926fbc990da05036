"""A chat panel over blended generation: type a question, watch the answer stream.

Explained in ``notebooks/05_chat_panel.ipynb``.

``ChatPanel`` puts ``helpers.sampling.generate`` (notebook 04) behind
ipywidgets.  Generation runs in a background thread that writes each token
into the view; Stop sets the ``threading.Event`` that ``generate`` checks
between two tokens.  The base model is a plain LM over "Title / Question /
Answer" legal text, so the conversation is written as ``Question: ...\n
Answer: ...`` turns; the oldest leave the prompt when it outgrows the context
window minus the new tokens (they stay on screen).

What did the memory change?  For each generated token, the base model's
greedy choice at the same prefix is ``argmax`` of the output embedding times
the step's final hidden state (``Step.key``): one matrix product per answer.
With temperature 0 every token that differs from it is one the memory
flipped; with sampling some differences are the dice, so the report also says
how many of them were the memory's own top token.
"""

from __future__ import annotations

import html
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import ipywidgets as W
import torch
from traitlets import validate

from .articles import TitleIndex, stored_indices
from .sampling import banned_tokens, generate
from .validate import check_int

STOP_AT = ("\nQuestion:", "\nTitle:", "\nAnswer:")  # the model starts a new record
MODE_LABELS = {"base": "base model only", "knn": "kNN-LM (datastore)",
               "memdec": "Memory Decoder"}
MISSING = {"knn": "kNN-LM mode needs the datastore and index that notebook 02 builds",
           "memdec": "Memory Decoder mode needs the checkpoint that notebook 03 trains"}
NO_GATE = ("Adaptive α needs a trained gate: run section 6 of notebooks/04_blended_sampling.ipynb "
           "(it saves data/artifacts/alpha_gate/) and pass gate=load_gate(...) to the panel")
# attribute: (description, min, max, step, default, what the ends mean)
SLIDERS = {"alpha": ("α", 0.0, 1.0, 0.05, 0.5, "0 = base model only, 1 = memory only"),
           "temperature": ("temperature", 0.0, 2.0, 0.05, 0.7, "0 = greedy"),
           "top_k": ("top-k", 1, 200, 1, 50, "1 = greedy"),
           "k": ("K", 1, 1024, 1, 32, "neighbours searched, at most the store's size"),
           "max_new_tokens": ("max new", 1, 256, 1, 64, "tokens per answer"),
           "no_repeat_ngram": ("no repeat n-gram", 0, 8, 1, 0,
                               "0 = off; n: never the same n tokens twice in an answer")}


def format_turn(question: str, answer: str | None = None, title: str | None = None) -> str:
    """One turn in the corpus's own format; ``answer=None`` leaves it open.

    With a ``title`` the turn is a whole record, ``Title: ...\nQuestion: ...
    \nAnswer: ...``: the format every article in the datastore was stored in.
    """
    head = f"Title: {title}\n" if title else ""
    return f"{head}Question: {question}\nAnswer:" + ("" if answer is None else f" {answer}")


def build_prompt(turns, question: str, count_tokens, budget: int, title: str | None = None):
    """``(prompt, n_dropped)``: the newest turns that fit in ``budget`` tokens.

    ``turns`` are earlier ``(question, answer)`` or ``(question, answer,
    title)`` tuples, oldest first; ``title`` heads the new question.
    ``count_tokens(text)`` counts what the model will read.  Returns
    ``(None, len(turns))`` when even the new question alone does not fit.
    """
    for dropped in range(len(turns) + 1):
        prompt = "\n\n".join([format_turn(*t) for t in turns[dropped:]]
                             + [format_turn(question, title=title)])
        if count_tokens(prompt) <= budget:
            return prompt, dropped
    return None, len(turns)


def doc_titles_for(store, texts, titles):
    """Titles of the store's documents (``stored_indices``), or ``None`` if the
    manifest's corpus fingerprint matches no selection of ``texts``."""
    rows = stored_indices(store, list(texts))
    return None if rows is None else [titles[i] for i in rows]


class _Checked:
    """Slider mixin: an out-of-range value keeps the old one and says why."""
    report, hint = None, ""  # report(message) is set by ChatPanel

    @validate("value")
    def _validate_value(self, proposal):
        value = proposal["value"]
        if self.min <= value <= self.max:
            return value
        if self.report:
            self.report(f"{self.description} must be between {self.min} and {self.max} "
                        f"({self.hint}); got {value}. Kept {self.value}.")
        return self.value


_FloatSlider = type("_FloatSlider", (_Checked, W.FloatSlider), {})
_IntSlider = type("_IntSlider", (_Checked, W.IntSlider), {})


@dataclass
class _Turn:
    user: str
    label: str                      # who answered, e.g. "Memory Decoder, α=0.3"
    answer: str = ""
    base_answer: str | None = None  # the α = 0 answer, when asked for
    notes: list[str] = field(default_factory=list)
    streaming: bool = True
    adaptive: bool = False          # answered with the adaptive α gate
    title: str | None = None        # the article title heading the prompt
    title_note: str = ""            # how it was chosen, shown under the question
    pieces: list[str] | None = None  # each token's text, once the answer is done
    changed: list[bool] | None = None  # ... and whether the memory changed that token


def _cut(text: str) -> str | None:
    """``text`` up to the first record marker, or ``None`` if there is none."""
    hits = [text.find(m) for m in STOP_AT if m in text]
    return text[:min(hits)] if hits else None


class ChatPanel:
    """A chat widget over ``generate``; display ``panel.widget``.

    Keyword arguments set the controls' starting values; a memory that is not
    given (``store`` + ``index``, or ``decoder``) makes its mode unavailable.
    With a ``gate`` (``helpers.gate.load_gate``) the "adaptive α" toggle lets
    it set the Memory Decoder's weight per token; the α slider then scales it.
    ``doc_titles[i]`` names store document ``i`` in kNN provenance;
    ``context_window`` defaults to the model's ``max_position_embeddings``.
    ``articles`` (``{title: its question}`` or a list of titles) fills the
    article box: the prompt is then headed ``Title: ...`` as every stored
    record is, with the title picked by the learner or found from the
    question (``TitleIndex``); ``stored_titles`` are those in the memory.
    ``compare=True`` starts with the α = 0 answer shown beside each answer.
    """

    def __init__(self, model, tokenizer, *, store=None, index=None, decoder=None,
                 gate=None, adaptive=False, doc_titles=None, mode="base", blend="probs",
                 knn_temperature=300.0, seed=0, context_window=None, articles=None,
                 stored_titles=None, compare=False, **settings):
        self.model, self.tokenizer, self.decoder, self.gate = model, tokenizer, decoder, gate
        self.store, self.index, self.doc_titles = store, index, doc_titles
        self.articles = (dict(articles) if isinstance(articles, dict) else
                         dict.fromkeys(articles or [], None))
        self.stored_titles = set(stored_titles or [])
        self.titles = TitleIndex(self.articles)
        self.blend, self.knn_temperature, self.seed = blend, knn_temperature, seed
        limit = model.config.get_text_config().max_position_embeddings
        if context_window is not None:
            context_window = check_int("context_window", context_window, 2, limit,
                                       example=limit)
        self.context_window = context_window or limit
        self.available = {"base": True, "knn": store is not None and index is not None,
                          "memdec": decoder is not None}
        self._turns, self._thread, self._stop = [], None, threading.Event()
        self.last_prompt, self.last_steps, self.last_sources = None, [], []
        said = self._collect = []  # messages until the panel exists, then one line
        self.status, self.view = W.HTML(), W.HTML()
        self.view.add_class("memdec-chat-view")
        self.status.add_class("memdec-chat-status")
        self.input = W.Textarea(placeholder="Ask about EU law, e.g. What is personal data?",
                                layout=W.Layout(flex="1 1 auto", width="auto", height="64px"))
        button = W.Layout(width="80px")
        self.send_button = W.Button(description="Send", button_style="primary", layout=button)
        self.stop_button = W.Button(description="Stop", button_style="warning", layout=button)
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self.mode = W.Dropdown(description="mode", options=[
            (MODE_LABELS[m] + ("" if ok else " (unavailable)"), m)
            for m, ok in self.available.items()])
        self.mode.observe(self._mode_changed, "value")
        for name, (label, lo, hi, step, default, hint) in SLIDERS.items():
            if name == "k":
                hi = max(1, min(hi, len(store) if store is not None else 1))
            cls = _FloatSlider if isinstance(step, float) else _IntSlider
            slider = cls(description=label, min=lo, max=hi, step=step, value=min(default, hi),
                         style={"description_width": "initial"})
            slider.report, slider.hint = self._say, hint
            setattr(self, name, slider)
        self.article = W.Combobox(
            description="article", options=list(self.articles), ensure_option=False,
            placeholder=("type to search the titles; empty: found from the question"
                         if self.articles else "no article list given"),
            disabled=not self.articles, style={"description_width": "initial"},
            layout=W.Layout(flex="1 1 auto", width="auto"))
        self.compare = W.Checkbox(description="also show the α = 0 answer", indent=False,
                                  value=bool(compare))
        self.adaptive = W.Checkbox(description="adaptive α (Memory Decoder: a gate sets "
                                   "α per token, the slider scales it)", indent=False)
        self.adaptive.observe(self._adaptive_changed, "value")
        wrap = W.Layout(flex_flow="row wrap")  # narrow screens: controls wrap
        self.widget = W.VBox([
            self.view, W.HBox([self.article]),
            W.HBox([self.input, W.VBox([self.send_button, self.stop_button],
                                       layout=W.Layout(flex="0 0 auto"))]),
            W.HBox([self.mode, self.alpha, self.temperature], layout=wrap),
            W.HBox([self.top_k, self.k, self.max_new_tokens,
                    self.no_repeat_ngram], layout=wrap),
            W.HBox([self.compare, self.adaptive], layout=wrap), self.status])
        self.widget.add_class("memdec-chat")
        for name, value in settings.items():
            if name not in SLIDERS:
                said.append(f"unknown setting {name}={value!r}; use {list(SLIDERS)}.")
            elif name != "k" or store is not None:  # without a store K means nothing
                getattr(self, name).value = value  # out of range: a message, no change
        if mode not in self.available:
            said.append(f"mode must be one of {list(self.available)}; got {mode!r}.")
        self.mode.value = mode if mode in self.available else "base"
        said += [MISSING[m] + "." for m, ok in self.available.items() if not ok]
        if adaptive and gate is None:
            said.append(NO_GATE + ".")
        self.adaptive.value = bool(adaptive and gate is not None)
        self._collect = None
        self._say(" ".join(said) or "Ready.")
        self.k.disabled = self.mode.value != "knn"
        self._render()

    # --- the controls -------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self._collect is not None:  # still in __init__
            return self._collect.append(message)
        self.status.value = html.escape(message, quote=False)

    def _mode_changed(self, change) -> None:
        if not self.available.get(change["new"], False):
            self._say(f"{MISSING[change['new']]}; staying in mode {change['old']!r}.")
            self.mode.value = change["old"]
        self.k.disabled = self.mode.value != "knn"  # alpha stays: base mode ignores it

    def _adaptive_changed(self, change) -> None:
        if change["new"] and self.gate is None:
            self.adaptive.value = False
            return self._say(NO_GATE + ".")
        if change["new"]:
            self._say("Adaptive α on: the gate sets the memory's weight per token "
                      "(mode Memory Decoder); α scales it, 1 lets the gate decide alone.")

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def history(self) -> list[tuple[str, str]]:
        """``(question, answer)`` pairs, oldest first (the newest may be streaming)."""
        return [(t.user, t.answer.strip()) for t in self._turns]

    @property
    def last_notes(self) -> list[str]:
        """What the panel reported under the newest answer (influence, sources)."""
        return list(self._turns[-1].notes) if self._turns else []

    # --- send / stop / wait -------------------------------------------------------

    def send(self, text: str | None = None):
        """Start answering ``text`` (default: the input box); the thread, or None."""
        text = (self.input.value if text is None else text).strip()
        if self.busy:
            return self._say("Still answering: wait for the answer or press Stop.")
        title, title_note = self.choose_title(text)
        if not text and title is not None and self.articles.get(title):
            text = self.articles[title]  # an article picked, no question: the record's own
        if not text:
            return self._say("Type a question first" + (
                ", or pick an article to ask its own question." if self.articles else "."))
        mode, n_new = self.mode.value, self.max_new_tokens.value
        if not self.available[mode]:
            return self._say(MISSING[mode] + ".")
        budget = self.context_window - n_new
        count = lambda s: len(self.tokenizer(s, add_special_tokens=True)["input_ids"])
        turns = [(t.user, t.answer.strip(), t.title) for t in self._turns]
        prompt, dropped = build_prompt(turns, text, count, budget, title=title)
        if prompt is None:
            return self._say(f"The question is {count(format_turn(text, title=title))} "
                             f"tokens (with its title) but only "
                             f"{budget} fit in the {self.context_window}-token context "
                             f"with {n_new} new tokens: shorten it or lower 'max new'.")
        kw = dict(temperature=self.temperature.value, top_k=self.top_k.value,
                  max_new_tokens=n_new, blend=self.blend, truncate_left=False,
                  seed=self.seed + len(self._turns),
                  no_repeat_ngram=self.no_repeat_ngram.value)
        alpha = self.alpha.value if mode != "base" else 0.0
        adaptive = self.adaptive.value and mode == "memdec"
        if self.adaptive.value and mode == "knn":
            return self._say("Adaptive α is trained for the Memory Decoder: switch the mode to "
                             "Memory Decoder, or untick 'adaptive α' for kNN-LM.")
        self._stop = stop = threading.Event()
        try:  # generate checks every argument before the first token
            stream = generate(self.model, self.tokenizer, prompt, mode=mode, alpha=alpha,
                              decoder=self.decoder, store=self.store, index=self.index,
                              k=self.k.value, knn_temperature=self.knn_temperature,
                              stop_event=stop, gate=self.gate, adaptive=adaptive, **kw)
        except ValueError as err:
            return self._say(str(err))
        label = (f", adaptive α ≤ {alpha:g}" if adaptive else
                 f", α={alpha:g}" if mode != "base" else "")
        turn = _Turn(text, MODE_LABELS[mode] + label, adaptive=adaptive, title=title,
                     title_note=title_note)
        self._turns.append(turn)
        self.last_prompt, self.input.value = prompt, ""
        note = (f"The oldest {dropped} turn(s) no longer fit in the {budget}-token prompt "
                "budget and were left out of the prompt (still shown above). "
                if dropped else "")
        self._say(note + "Answering... (Stop interrupts)")
        base_kw = kw if self.compare.value and mode != "base" else None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        args=(turn, stream, prompt, base_kw, stop, note))
        self._thread.start()
        return self._thread

    def choose_title(self, question: str):
        """``(title or None, what the panel says about it)`` for the next prompt.

        The article box wins when it holds a known title; otherwise the title
        closest to the question (``TitleIndex``); otherwise no title.
        """
        if not self.articles:
            return None, ""
        picked, said = self.article.value.strip(), ""
        if picked in self.articles:
            return picked, f"Article used: {picked}{self._where(picked)}, picked by you."
        if picked:
            said = f"No article is titled “{picked[:80]}”; "
        found = self.titles.match(question) if question else None
        if found is None:
            return None, (said + "no article matched; answering without a title "
                          "(pick one in the article box to ask about it).")
        return found[0], (said + f"Article used: {found[0]}{self._where(found[0])}, "
                          f"found from the question (title match {found[1]:.2f}).")

    def _where(self, title: str) -> str:
        if not self.stored_titles:
            return ""
        return (" (in the memory)" if title in self.stored_titles
                else " (not in the memory)")

    def stop(self) -> None:
        """Ask the running answer to stop after the current token."""
        if not self.busy:
            return self._say("Nothing to stop: no answer is being written.")
        self._stop.set()
        self._say("Stopping after this token...")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current answer is done; False if it is still running."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy

    # --- the worker thread --------------------------------------------------------

    def _stream_into(self, turn, attr, stream) -> tuple[list, bool]:
        """Append each step's text to ``turn.<attr>``, re-rendering; (steps, cut)."""
        steps = []
        for step in stream:
            steps.append(step)
            text = getattr(turn, attr) + step.text
            cut = _cut(text)
            setattr(turn, attr, text if cut is None else cut)
            self._render()
            if cut is not None:
                return steps, True
        return steps, False

    def _run(self, turn, stream, prompt, base_kw, stop, note) -> None:
        tic, message = time.perf_counter(), ""
        try:
            steps, cut = self._stream_into(turn, "answer", stream)
            seconds, self.last_steps = time.perf_counter() - tic, steps
            stopped = stop.is_set() and not cut and not (steps and steps[-1].finished)
            message = (f"{'Stopped by you' if stopped else 'Done'}: {len(steps)} tokens in "
                       f"{seconds:.1f} s ({len(steps) / max(seconds, 1e-9):.1f} tokens/s).")
            turn.notes += (self._influence(steps, turn)
                           + (self._adaptive_note(steps) if turn.adaptive else [])
                           + self._sources(steps))
            if base_kw is not None and not stop.is_set():
                turn.base_answer = ""
                base_steps, base_cut = self._stream_into(turn, "base_answer", generate(
                    self.model, self.tokenizer, prompt, stop_event=stop, **base_kw))
                if (stop.is_set() and not base_cut
                        and not (base_steps and base_steps[-1].finished)):
                    turn.base_answer += " [stopped]"
                    message = (f"Stopped by you during the α = 0 answer; the answer above "
                               f"is complete: {message.split(': ', 1)[1]}")
        except Exception as err:  # a sentence in the panel, never a traceback
            message = f"The answer stopped early: {type(err).__name__}: {err}"
        finally:
            turn.streaming = False
            self._render()
            self._say(note + message)

    def _influence(self, steps, turn=None) -> list[str]:
        """How many tokens differ from the base model's greedy choice (see top)."""
        if not steps or steps[0].memory_top_id is None:
            return []
        layer = (self.store.manifest.get("layer", -1) if steps[0].doc_ids is not None
                 else getattr(self.decoder.config, "layer", -1))  # the state Step.key holds
        # (a token-level decoder reads no hidden state: Step.key is then the last one)
        if layer not in (None, -1):
            return [f"(memory influence not measured: the memory reads layer {layer})"]
        weight = self.model.get_output_embeddings().weight            # (V, D)
        keys = torch.stack([s.key for s in steps]).to(weight)         # (N, D)
        with torch.inference_mode():  # a final-logit softcap never moves the argmax
            logits = (keys @ weight.T).float()                        # (N, V)
            ids, n = [s.token_id for s in steps], self.no_repeat_ngram.value
            for i in range(len(steps)):  # the base model obeys the same ban
                logits[i, banned_tokens(ids[:i], n)] = float("-inf")
            base_top = logits.argmax(-1).tolist()                     # (N,)
        differ = [s for s, b in zip(steps, base_top) if s.token_id != b]
        if turn is not None:  # for the highlighted view
            turn.pieces = [s.text for s in steps]
            turn.changed = [s.token_id != b for s, b in zip(steps, base_top)]
        own = sum(s.token_id == s.memory_top_id for s in differ)
        greedy = self.temperature.value == 0 or self.top_k.value == 1
        why = ("greedy decoding: each is a flip by the memory" if greedy else
               f"{own} of them the memory's top token; the rest is sampling")
        return [f"Memory influence: {len(differ)} of {len(steps)} tokens "
                f"({len(differ) / len(steps):.0%}) differ from the base model's greedy "
                f"choice ({why})."]

    def _adaptive_note(self, steps) -> list[str]:
        """Adaptive α: how much the memory spoke, on average and at most."""
        if not steps:
            return []
        alphas = [s.alpha for s in steps]
        return [f"Adaptive α: mean {sum(alphas) / len(alphas):.2f}, from {min(alphas):.2f} "
                f"to {max(alphas):.2f} over {len(steps)} tokens."]

    def _sources(self, steps) -> list[str]:
        """kNN provenance: the neighbours' documents, most frequent first."""
        counts = Counter(d for s in steps for d in (s.doc_ids or []))
        titles, total = self.doc_titles or [], sum(counts.values())
        self.last_sources = [(titles[d] if d < len(titles) else f"document {d}", n)
                             for d, n in counts.most_common()]
        top = "; ".join(f"{t} ({n / max(total, 1):.0%})" for t, n in self.last_sources[:3])
        return [f"Neighbours came from: {top}"] if total else []

    # --- the view -----------------------------------------------------------------

    def _answer_html(self, t) -> str:
        """The answer, with the tokens the memory changed marked (once it is done)."""
        if t.streaming or t.pieces is None or not any(t.changed):
            return html.escape(t.answer.strip(), quote=False)
        out, left = [], len(t.answer)  # the answer may end before its last token
        for piece, changed in zip(t.pieces, t.changed):
            piece, left = piece[:left], left - len(piece)
            text = html.escape(piece, quote=False)
            out.append(f"<mark class='memdec-changed' title='the memory changed this token' "
                       f"style='background:#ffe08a;padding:0'>{text}</mark>"
                       if changed and piece.strip() else text)
            if left <= 0:
                break
        return "".join(out).strip()

    def _render(self) -> None:
        esc = lambda s: html.escape(s.strip(), quote=False)
        p = "<p style='margin:2px 0 6px 0;{}'>".format  # compact paragraphs
        rows = []
        for t in self._turns:
            cursor = " ▌" if t.streaming else ""
            rows.append(f"{p('')}<b>You:</b> {esc(t.user)}</p>")
            if t.title_note:
                rows.append(f"{p('color:#555;font-size:90%')}{esc(t.title_note)}</p>")
            mine = (f"{p('')}<b>Model ({esc(t.label)}):</b> {self._answer_html(t)}"
                    f"{cursor}</p>")
            if t.base_answer is None:
                rows.append(mine)
            else:  # side by side: the same prompt and seed, with and without the memory
                base = (f"{p('color:#555')}<b>α = 0 (base model):</b> "
                        f"{esc(t.base_answer)}</p>")
                col = "<div style='flex:1 1 280px;min-width:0'>{}</div>".format
                rows.append("<div class='memdec-compare' style='display:flex;gap:12px;"
                            f"flex-wrap:wrap'>{col(mine)}{col(base)}</div>")
            rows += [f"{p('color:#777;font-size:90%')}{esc(n)}</p>" for n in t.notes]
        if any(t.changed and any(t.changed) for t in self._turns):
            rows.append(f"{p('color:#777;font-size:90%')}<mark style='background:#ffe08a'>"
                        "marked</mark>: tokens where the memory changed the base model's "
                        "greedy choice.</p>")
        body = "".join(rows) or f"{p('color:#777')}No questions yet.</p>"
        # column-reverse keeps the newest text in sight as the view scrolls
        self.view.value = ("<div style='display:flex;flex-direction:column-reverse;"
                           "height:320px;overflow-y:auto;white-space:pre-wrap;"
                           "border:1px solid #ddd;padding:4px 8px'>"
                           f"<div>{body}</div></div>")
