"""Checkable tasks with gold answers, in two differently built families (seeded).

Family "a" (120 tasks): person extraction, sentiment labels, short arithmetic with symbols.
Family "b" (120 tasks): company extraction from other sentence templates, topic labels over four classes,
arithmetic as word problems: another schema, another label set, other prompts; used to check that what is
chosen on family "a" holds on tasks it was not chosen on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

NAMES = [
    "Maria Lopez", "John Carter", "Aiko Tanaka", "Lars Nilsson", "Fatima Khan", "Pedro Alves", "Chen Wei",
    "Olga Petrova", "Samuel Okafor", "Emma Dubois", "Ravi Patel", "Sofia Rossi", "Tom Becker", "Nora Haddad",
    "Diego Ramirez", "Hannah Schmidt", "Kofi Mensah", "Lucy Walsh", "Ivan Horvat", "Mei Lin",
]
JOBS = ["nurse", "teacher", "plumber", "architect", "chef", "pilot", "lawyer", "baker", "engineer", "farmer"]
CITIES = ["Madrid", "Lisbon", "Osaka", "Oslo", "Lagos", "Toronto", "Lyon", "Krakow", "Denver", "Cairo"]
TEMPLATES = [
    "{name}, {age}, works as a {job} in {city}.",
    "Meet {name}: a {age}-year-old {job} living in {city}.",
    "In {city}, {name} ({age}) has been a {job} for years.",
    "{name} is a {job}. She or he is {age} years old and lives in {city}.",
]
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "job": {"type": "string", "maxLength": 30},
        "city": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "age", "job", "city"],
    "additionalProperties": False,
}
REVIEWS = {
    "positive": [
        "Absolutely loved it, would buy again.", "The staff were wonderful and the food was delicious.",
        "Best purchase I have made this year.", "Fast delivery and great quality.",
        "I am delighted with how well it works.", "A fantastic experience from start to finish.",
        "Brilliant service, thank you so much!", "Exceeded all my expectations.",
        "Works perfectly and looks beautiful.", "Highly recommended to everyone.",
    ],
    "negative": [
        "Terrible quality, it broke after one day.", "The worst customer service I have ever had.",
        "Completely useless and overpriced.", "It arrived late and damaged.",
        "I want my money back, very disappointed.", "Awful taste and cold food.",
        "Do not buy this, it is a scam.", "The battery died within an hour.",
        "Rude staff and a dirty room.", "Never again, a total waste of time.",
    ],
    "neutral": [
        "The package arrived on Tuesday.", "It is a blue shirt in size medium.",
        "The store opens at nine in the morning.", "I ordered two of them last week.",
        "The manual has twelve pages.", "It comes in a cardboard box.",
        "The meeting was moved to Friday.", "The device weighs about a kilogram.",
        "Delivery took the usual three days.", "The menu lists soups and salads.",
    ],
}


@dataclass(frozen=True)
class Task:
    kind: str  # "extract", "classify" or "arith"
    prompt: str
    gold: Any
    options: dict[str, Any] = field(default_factory=dict)  # extra request fields

    def correct(self, answer: str) -> bool:
        text = answer.strip()
        if self.kind == "classify":
            return text.casefold() == str(self.gold)
        if self.kind == "arith":
            return text == str(self.gold)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return False
        if not isinstance(data, dict):
            return False
        return all(" ".join(str(data.get(key, "")).casefold().split()) == str(value).casefold()
                   for key, value in self.gold.items())


def extraction_tasks(rng: random.Random, count: int) -> list[Task]:
    tasks = []
    for _ in range(count):
        person = {"name": rng.choice(NAMES), "age": rng.randint(19, 79), "job": rng.choice(JOBS),
                  "city": rng.choice(CITIES)}
        text = rng.choice(TEMPLATES).format(**person)
        prompt = (
            "Extract the person from the text as JSON with the fields name, age, job and city.\n\n"
            f"Text: {text}\n\nJSON:"
        )
        options = {"response_format": {"type": "json_schema", "json_schema": {"name": "person",
                                                                                "schema": PERSON_SCHEMA}}}
        tasks.append(Task("extract", prompt, person, options))
    return tasks


def classification_tasks() -> list[Task]:
    tasks = []
    for label, reviews in REVIEWS.items():
        for review in reviews:
            prompt = (
                "Classify the sentiment of the review as positive, negative or neutral.\n\n"
                f"Review: {review}\n\nSentiment:"
            )
            tasks.append(Task("classify", prompt, label, {"extra_body": {"tiergate": {
                "choices": ["positive", "negative", "neutral"]}}}))
    return tasks


def arithmetic_tasks(rng: random.Random, count: int) -> list[Task]:
    tasks = []
    for _ in range(count):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["+", "-", "*"])
        gold = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = f"Compute {a} {op} {b}. Reply with the number only.\n\nAnswer:"
        tasks.append(Task("arith", prompt, gold, {"extra_body": {"tiergate": {"regex": r"-?\d{1,5}"}}}))
    return tasks


def all_tasks(seed: int = 7) -> list[Task]:
    rng = random.Random(seed)
    return [*extraction_tasks(rng, 50), *classification_tasks(), *arithmetic_tasks(rng, 40)]


COMPANIES = [
    "Norden Steel", "Blue Harbor Foods", "Kestrel Labs", "Ashford Textiles", "Solvane Energy", "Quill Media",
    "Pinecrest Motors", "Arcadia Software", "Tidewater Shipping", "Marlow Pharma", "Orbis Telecom", "Halden Glass",
]
COUNTRIES = ["Norway", "Chile", "Kenya", "Canada", "Japan", "Brazil", "Poland", "Egypt", "India", "Spain"]
INDUSTRIES = ["steel", "food", "software", "textiles", "energy", "media", "cars", "shipping", "medicine", "glass"]
COMPANY_TEMPLATES = [
    "Founded in {founded}, {company} is a {industry} company based in {country}.",
    "{company} ({country}) has made {industry} products since {founded}.",
    "The {industry} maker {company} started in {country} in {founded}.",
    "Since {founded}, {country}'s {company} has worked in {industry}.",
]
COMPANY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "company": {"type": "string", "maxLength": 30},
        "founded": {"type": "integer", "minimum": 1800, "maximum": 2025},
        "country": {"type": "string", "maxLength": 20},
        "industry": {"type": "string", "maxLength": 20},
    },
    "required": ["company", "founded", "country", "industry"],
    "additionalProperties": False,
}
TOPICS = {
    "sports": ["The striker scored twice in the final minutes.", "She won the marathon in record time.",
               "The team signed a new goalkeeper.", "Tickets for the tennis final sold out.",
               "He broke the national swimming record."],
    "business": ["Shares fell after the quarterly report.", "The bank raised its interest rates.",
                 "The startup was bought for two million dollars.", "Profits doubled this year.",
                 "The company cut five hundred jobs."],
    "science": ["The telescope found a new planet.", "Researchers mapped the protein's structure.",
                "The vaccine trial reached its third phase.", "A new species of frog was discovered.",
                "Physicists measured the particle's mass."],
    "food": ["Add the garlic and fry it for two minutes.", "The bakery sells sourdough bread.",
             "This soup needs more salt.", "Serve the pasta with fresh basil.",
             "The restaurant's dumplings are famous."],
}
WORD_PROBLEMS = [
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", "+"),
    ("A box holds {a} pens. {b} pens are taken out. How many pens are left?", "-"),
    ("There are {a} rows with {b} chairs in each. How many chairs are there?", "*"),
]


def company_tasks(rng: random.Random, count: int) -> list[Task]:
    tasks = []
    for _ in range(count):
        company = {"company": rng.choice(COMPANIES), "founded": rng.randint(1850, 2020),
                   "country": rng.choice(COUNTRIES), "industry": rng.choice(INDUSTRIES)}
        text = rng.choice(COMPANY_TEMPLATES).format(**company)
        prompt = f"From this sentence, give the company, the year it was founded, its country and industry.\n{text}"
        options = {"response_format": {"type": "json_schema", "json_schema": {"name": "company",
                                                                                "schema": COMPANY_SCHEMA}}}
        tasks.append(Task("extract", prompt, company, options))
    return tasks


def topic_tasks(rng: random.Random) -> list[Task]:
    tasks = []
    for label, sentences in TOPICS.items():
        for sentence in sentences:
            prompt = f"Which topic is this sentence about: sports, business, science or food?\n\"{sentence}\""
            tasks.append(Task("classify", prompt, label, {"extra_body": {"tiergate": {
                "choices": ["sports", "business", "science", "food"]}}}))
    rng.shuffle(tasks)
    return tasks


def word_problem_tasks(rng: random.Random, count: int) -> list[Task]:
    tasks = []
    for _ in range(count):
        template, op = rng.choice(WORD_PROBLEMS)
        a, b = rng.randint(3, 40), rng.randint(2, 12)
        if op == "-":
            a += b
        gold = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = template.format(name=rng.choice(NAMES).split()[0], a=a, b=b) + " Answer with a number."
        tasks.append(Task("arith", prompt, gold, {"extra_body": {"tiergate": {"regex": r"\d{1,4}"}}}))
    return tasks


def family_b(seed: int = 1234) -> list[Task]:
    rng = random.Random(seed)
    return [*company_tasks(rng, 50), *topic_tasks(rng), *word_problem_tasks(rng, 50)]


FAMILIES = {"a": all_tasks, "b": family_b}
