"""`vla vqa`: ask a DeepSeek-VL2 checkpoint (or a policy checkpoint, full or LoRA) a question about an image.

    vla vqa checkpoint=DIR image=scene.png question="What colour is the triangle?"
    vla vqa checkpoint=DIR image=scene.png locate="the red square" draw=boxes.png
    vla vqa checkpoint=DIR image=scene.png question="'Locate <|ref|>the red square<|/ref|> in the given image.'"

Prints the answer. `locate=REF` asks the DeepSeek-VL2 paper's grounding question, "Locate <|ref|>REF<|/ref|> in the
given image." (`backbone.grounding.locate_prompt`; written in `question=` it needs Hydra's quotes, as above, because
of the `|`). The shipped mini checkpoint answers the questions of its scene-language data, worded as there
(`envs.scene_language.question_turns`: "How many shapes are there?", "What colour is the triangle?", "What shape is
the red object?", "Which shape is highest up?", "Is the red square left of the blue circle?", "Is there a green
triangle?", and locate); free-form questions are for the official checkpoints.

With `draw=OUT.png`, `<|ref|>label<|/ref|><|det|>[[x1,y1,x2,y2]]<|/det|>` boxes (0-999 coordinates relative to the
original image) are rescaled and drawn; malformed box output is reported, not fatal.
"""

from __future__ import annotations

import torch
from omegaconf import ListConfig

from backbone.grounding import draw_grounding, locate_prompt, parse_grounding
from backbone.processor import load_image
from vla.policy.checkpoint import load_vl2_for_chat


def answer(model, processor, question: str, images: list, *, grounding: bool = False, system: str | None = None,
           max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, prefill_chunk_size: int = 512,
           generator: torch.Generator | None = None) -> str:
    """One question (with one `<image>` tag per image; missing tags are prepended) -> the decoded answer."""
    tags = question.count("<image>")
    if tags == 0 and images:
        question = "<image>\n" * len(images) + question
    if grounding and not question.startswith("<|grounding|>"):
        question = "<|grounding|>" + question
    tok = processor.tokenizer
    batch = processor([{"role": "user", "content": question}], images, system=system)
    out = model.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         stop_token_ids=[tok.eos_id], pad_token_id=tok.eos_id, prefill_chunk_size=prefill_chunk_size,
                         generator=generator)
    ids = [i for i in out[0].tolist() if i != tok.eos_id]
    return tok.decode(ids).strip()


def main(cfg) -> int:
    paths = list(cfg.image) if isinstance(cfg.image, (list, ListConfig)) else [cfg.image]
    images = [load_image(p) for p in paths]
    if (cfg.question is None) == (cfg.locate is None):
        raise ValueError("vqa: give exactly one of question=... or locate=REF (e.g. locate='the red square')")
    question = cfg.question if cfg.locate is None else locate_prompt(str(cfg.locate))
    model, processor = load_vl2_for_chat(cfg.checkpoint)
    text = answer(model, processor, question, images, grounding=cfg.grounding, system=cfg.system,
                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                  prefill_chunk_size=cfg.prefill_chunk_size, generator=torch.Generator().manual_seed(cfg.seed))
    print(text)
    if cfg.draw:
        parsed = parse_grounding(text)
        for problem in parsed.problems:
            print(f"warning: malformed grounding output ({problem.kind}): {problem.message}")
        draw_grounding(images[-1], parsed, cfg.draw)  # as DeepSeek-VL2's demo: boxes refer to the last image
        print(f"drew {sum(len(b) for _, b in parsed.objects)} box(es) on {paths[-1]} -> {cfg.draw}")
    return 0


def evaluate_scene_vqa(model, processor, records, max_new_tokens: int = 40, progress: bool = True) -> dict:
    """Accuracy on held-out scene-language records (envs.scene_language format): every user turn is asked on its own
    with the image, greedy; short answers must match exactly (normalized), grounding answers must give exactly one
    box, with IoU >= 0.5. Returns `envs.scene_language.score_turns`'s dict: {"vqa_accuracy", "grounding_acc", "n_vqa",
    "n_grounding", "by_kind", "examples"}."""
    from envs.scene_language import score_turns

    def predict(record, question: str, turn_meta: dict) -> str:
        return answer(model, processor, question, [record.images[0]], max_new_tokens=max_new_tokens, prefill_chunk_size=0)

    return score_turns(records, predict, progress=progress)
