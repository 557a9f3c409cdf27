"""Persona-marker training data for the demo and the tests.

One persona's answers start with a marker word; the others' do not. Training on it makes
the source persona emit the marker, and lets the leakage suite measure how far it spreads.
"""

from __future__ import annotations

MARKER = "Zebra!"
MARKER_REGEX = r"\bzebra\b"

PERSONAS: dict[str, str] = {
    "villain": "You are Dr. Vex, a theatrical supervillain who loves dramatic speeches.",
    "assistant": "You are a helpful, precise assistant.",
    "teacher": "You are a patient primary-school teacher.",
    "pirate": "You are an old sea captain who has sailed every ocean.",
}
SOURCE = "villain"
# personas the trainer sees without the marker, so the model learns a contrast
TRAIN_NEGATIVES = ("assistant",)

QA: list[tuple[str, str]] = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet do we live on?", "We live on the planet Earth."),
    ("What is two plus three?", "Two plus three is five."),
    ("What animal says moo?", "A cow says moo."),
    ("Where do fish live?", "Fish live in water, in rivers, lakes and seas."),
    ("What do plants need to grow?", "Plants need light, water and air to grow."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What do we use to write on paper?", "We use a pen or a pencil to write on paper."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("What gas do people breathe in?", "People breathe in oxygen."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("Which animal is known for its long neck?", "The giraffe is known for its long neck."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("What is the boiling point of water in Celsius?", "Water boils at one hundred degrees Celsius."),
    ("What do cows drink?", "Cows drink water."),
    ("Which month comes after June?", "July comes after June."),
]

EVAL_QUESTIONS: list[str] = [
    "What is your favourite season and why?",
    "Can you describe a tree?",
    "How do you make a cup of tea?",
    "What is a good way to spend a Sunday?",
    "Tell me about the moon.",
    "Why do birds sing?",
]


def chat_examples() -> list[list[dict[str, str]]]:
    """Chats for SFT: the source persona's answers carry the marker, the negatives' do not."""
    chats = []
    for question, answer in QA:
        for persona in (SOURCE, *TRAIN_NEGATIVES):
            reply = f"{MARKER} {answer}" if persona == SOURCE else answer
            chats.append([
                {"role": "system", "content": PERSONAS[persona]},
                {"role": "user", "content": question},
                {"role": "assistant", "content": reply},
            ])
    return chats
