"""Prompts: zero-shot templates for the image tasks, input templates and answers for GLUE.

These are this project's own wordings (a task's ``templates`` / ``template`` in the YAML
replaces them). Zero-shot accuracies depend on the wording by a few points, so numbers are
comparable within this project, not digit for digit with other codebases' prompt lists.

GLUE answers. The FLAN-T5 GLUE experts of FusionBench were fine-tuned to answer with these
words (per GLUE label index): CoLA unacceptable/acceptable; MNLI entailment/neutral/
contradiction; MRPC, QQP no/yes; QNLI, RTE yes/no (label 0 is "entailment"); SST-2 negative/
positive; STS-B the score with one decimal. The answer strings must match what the experts
learned; the input wording matters less (and is ours).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

GENERIC = [
    "an image of a {}.",
    "a picture showing a {}.",
    "a close-up photograph of the {}.",
    "a {} in a photograph.",
]

_BY_TASK: Dict[str, List[str]] = {
    "sun397": ["a photograph taken at a {}.", "a scene of a {}.", "an image of the {} scene."],
    "cars": ["a photograph of a {} car.", "a {}, a type of automobile.", "an image of the {} vehicle."],
    "resisc45": ["an aerial photograph of a {}.", "overhead remote sensing imagery showing a {}.",
                 "a satellite view of a {}."],
    "eurosat": ["a satellite image of {}.", "a Sentinel-2 view of {} land.", "top-down remote sensing picture of {}."],
    "svhn": ["a house number photo showing the digit {}.", "a street sign with the number {}.",
             "the digit {} seen on a building."],
    "gtsrb": ["a road sign meaning {}.", "a photo of the traffic sign: {}.", "a German traffic sign of {}."],
    "mnist": ["a handwritten digit {}.", "a scan of the handwritten number {}.", "the number {} written by hand."],
    "dtd": ["a surface with a {} texture.", "a close-up of a {} pattern.", "an image of {} texture."],
    "flowers102": ["a photograph of a {}, a kind of flower.", "a blooming {}.", "a garden flower called {}."],
    "pcam": ["a histopathology slide patch showing {}.", "a microscope image of lymph node tissue: {}."],
    "fer2013": ["a face showing {} emotion.", "a person who looks {}.", "a greyscale portrait with a {} expression."],
    "pet": ["a photograph of a {}, a kind of pet.", "a {} resting at home.", "a cute {}."],
    "stl10": GENERIC,
    "cifar10": GENERIC + ["a small low-resolution picture of a {}."],
    "cifar100": GENERIC + ["a small low-resolution picture of a {}."],
    "food101": ["a plate of {}, a dish.", "a serving of {}.", "a dish of {} on a table."],
    "fashionmnist": ["a small greyscale picture of a {}, an item of clothing.", "a product photo of a {}."],
    "emnistletters": ["a handwritten letter {}.", "the character {} written by hand."],
    "kmnist": ["a handwritten Japanese character {}.", "the hiragana {} written by hand."],
    "renderedsst2": ["a rendered sentence with {} sentiment.", "text expressing a {} opinion."],
}
_ALIASES = {"stanfordcars": "cars", "oxfordflowers102": "flowers102",
            "oxfordiiitpet": "pet", "oxfordiiitpets": "pet", "pets": "pet"}


def _key(task: str) -> str:
    return re.sub(r"[^a-z0-9]", "", task.lower())


def image_templates(task: str) -> List[str]:
    """The default templates of an image task (by a loose match on its name; else generic)."""
    key = _key(task)
    key = _ALIASES.get(key, key)
    return list(_BY_TASK.get(key, GENERIC))


# --------------------------------------------------------------------------- GLUE


GLUE: Dict[str, dict] = {
    "cola": dict(
        template="Is this sentence acceptable English grammar? Sentence: {sentence} "
        "Reply acceptable or unacceptable.",
        answers=["unacceptable", "acceptable"],
    ),
    "mnli": dict(
        template="Premise: {premise} Hypothesis: {hypothesis} Does the premise entail the hypothesis, "
        "contradict it, or neither? Reply entailment, neutral or contradiction.",
        answers=["entailment", "neutral", "contradiction"],
    ),
    "mrpc": dict(
        template="First sentence: {sentence1} Second sentence: {sentence2} Do both sentences say the same "
        "thing? Reply yes or no.",
        answers=["no", "yes"],
    ),
    "qnli": dict(
        template="Question: {question} Passage: {sentence} Does the passage answer the question? Reply yes or no.",
        answers=["yes", "no"],
    ),
    "qqp": dict(
        template="First question: {question1} Second question: {question2} Are the two questions asking "
        "the same thing? Reply yes or no.",
        answers=["no", "yes"],
    ),
    "rte": dict(
        template="Text: {sentence1} Claim: {sentence2} Does the text show that the claim is true? Reply yes or no.",
        answers=["yes", "no"],
    ),
    "sst2": dict(
        template="Review: {sentence} Is the feeling of this review positive or negative?",
        answers=["negative", "positive"],
    ),
    "stsb": dict(
        template="First sentence: {sentence1} Second sentence: {sentence2} How close in meaning are the "
        "two sentences, on a scale from 0 to 5?",
        answers=None,
        regression=True,
    ),
}

STSB_GRID = [i / 10 for i in range(51)]  # 0.0, 0.1, ..., 5.0: the scores an STS-B expert writes


def score_text(value: float) -> str:
    """How a regression target is written (one decimal, as the STS-B experts learned)."""
    return f"{round(float(value), 1):.1f}"


def template_fields(template: str) -> List[str]:
    return [m for m in re.findall(r"{([A-Za-z_][A-Za-z0-9_]*)}", template)]


def glue_prompt(glue_task: Optional[str]) -> Optional[dict]:
    return GLUE.get(glue_task) if glue_task else None
