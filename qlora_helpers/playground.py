"""Notebook 04's playground: type a prompt (or pick a held-out one) and see the base and the fine-tuned answer
side by side, with the token budget as a control. Built from ipywidgets; nothing waits for input. Where nobody can
type (papermill, nbmake, a Kaggle "Save Version" run) it shows one real answer pair as a static table instead, so
the saved notebook holds something to read rather than a widget's text form."""
from __future__ import annotations

import json
from typing import Any

from .data import Formatter
from .evaluate import generate, held_out_prompts
from .stage import Stage


def answer_pair(stage: Stage, model, tokenizer, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers of the base (adapter off) and the fine-tuned model to one user message, formatted as in
    training; each with whether it stopped with the end-of-turn token within the budget."""
    cfg = stage.cfg
    formatter = Formatter(tokenizer, cfg.data.template, cfg.data.system_prompt)
    ids = formatter.prompt_ids([{"role": "user", "content": prompt}], json.dumps([prompt, ""]))
    stop_ids = sorted({formatter.end_token_id, tokenizer.eos_token_id} - {None})
    out = {}
    with model.disable_adapter():
        out["base"] = generate(model, tokenizer, [ids], max_new_tokens, 1, stop_ids)[0][0]
    out["fine-tuned"] = generate(model, tokenizer, [ids], max_new_tokens, 1, stop_ids)[0][0]
    return out


def pair_table(prompt: str, answers: dict[str, Any]):
    """One prompt and the two answers as an HTML table ("…" where an answer ran into the budget without stopping)."""
    import html

    from IPython.display import HTML

    cells = "".join(f"<td style='vertical-align:top;padding:6px;text-align:left'><b>{label}</b><br>"
                    f"{html.escape(a['answer'])}{'' if a['stopped'] else ' …'}</td>" for label, a in answers.items())
    return HTML(f"<table style='width:100%'><tr><td style='vertical-align:top;padding:6px;text-align:left'><b>prompt"
                f"</b><br>{html.escape(prompt)}</td>{cells}</tr></table>")


def playground(stage: Stage, model, tokenizer):
    """The widget: a held-out prompt picker, a text box, a token budget slider, an Answer button, and the two
    answers side by side below it. Run where nobody can type: the first held-out prompt's answers, as a table."""
    import ipywidgets as w

    from .places import interactive

    examples, _, _ = held_out_prompts(stage, tokenizer)
    users = [json.loads(e["prompt_messages"])[-1]["content"] for e in examples]
    if not interactive():
        return pair_table(users[0], answer_pair(stage, model, tokenizer, users[0], stage.cfg.eval.max_new_tokens))
    pick = w.Dropdown(options=[("type your own below", -1)] + [(u[:70], i) for i, u in enumerate(users)],
                      description="held-out", layout=w.Layout(width="95%"))
    text = w.Textarea(placeholder="Type a prompt, or pick a held-out one above",
                      layout=w.Layout(width="95%", height="5em"))
    budget = w.IntSlider(value=stage.cfg.eval.max_new_tokens, min=8, max=512, step=8, description="new tokens")
    button = w.Button(description="Answer", button_style="primary")
    out = w.Output()

    def on_pick(change):
        if change["new"] >= 0:
            text.value = users[change["new"]]

    def on_click(_):
        out.outputs = ()
        if not text.value.strip():
            out.append_stdout("type a prompt first\n")
            return
        out.append_display_data(pair_table(text.value, answer_pair(stage, model, tokenizer, text.value, budget.value)))

    pick.observe(on_pick, names="value")
    button.on_click(on_click)
    return w.VBox([pick, text, w.HBox([budget, button]), out])
