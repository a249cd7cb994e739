"""Checkable tasks with gold answers, in two differently built families (seeded).

Family "a": person extraction, sentiment labels, short arithmetic with symbols, free-text questions (capitals,
opposites). Family "b": company extraction from other sentence templates, topic labels over four classes,
arithmetic as word problems, free-text questions of other kinds (colours, counts): another schema, another label
set, other prompts; used to check that what is chosen on family "a" holds on tasks it was not chosen on.

Kinds: "extract" (a JSON schema), "classify" (a choice set), "arith" (a regex), "text" (no constraint: free chat,
judged by whether a gold word appears in the answer).
"""

from __future__ import annotations

import json
import random
import re
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
    kind: str  # "extract", "classify", "arith" or "text"
    prompt: str
    gold: Any
    options: dict[str, Any] = field(default_factory=dict)  # extra request fields

    def correct(self, answer: str) -> bool:
        text = answer.strip()
        if self.kind == "classify":
            return text.casefold() == str(self.gold)
        if self.kind == "arith":
            return text == str(self.gold)
        if self.kind == "text":
            words = re.findall(r"[a-z0-9]+", text.casefold())
            return any(gold in words for gold in self.gold)
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


# The answer may end with a newline: without it the constraint leaves a base model (Gemma), which never ends a
# number with its end-of-text token, no way to stop but running on to the bound ("14000" for 14).
ARITH_REGEX = r"-?\d{1,5}\n?"
WORD_PROBLEM_REGEX = r"\d{1,4}\n?"


def arithmetic_tasks(rng: random.Random, count: int) -> list[Task]:
    tasks = []
    for _ in range(count):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["+", "-", "*"])
        gold = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = f"Compute {a} {op} {b}. Reply with the number only.\n\nAnswer:"
        tasks.append(Task("arith", prompt, gold, {"extra_body": {"tiergate": {"regex": ARITH_REGEX}}}))
    return tasks


CAPITALS = {
    "France": "paris", "Japan": "tokyo", "Italy": "rome", "Spain": "madrid", "Germany": "berlin",
    "Egypt": "cairo", "Russia": "moscow", "Greece": "athens", "Portugal": "lisbon", "Norway": "oslo",
    "Sweden": "stockholm", "Poland": "warsaw", "Ireland": "dublin", "Austria": "vienna", "Kenya": "nairobi",
    "Peru": "lima", "Cuba": "havana", "Thailand": "bangkok", "Finland": "helsinki", "Hungary": "budapest",
}
OPPOSITES = {
    "hot": "cold", "up": "down", "day": "night", "big": "small", "fast": "slow", "happy": "sad", "open": "closed",
    "wet": "dry", "light": "dark", "full": "empty", "old": "young", "hard": "soft", "early": "late",
    "rich": "poor", "win": "lose", "thick": "thin", "strong": "weak", "loud": "quiet", "buy": "sell", "push": "pull",
}


def question_tasks() -> list[Task]:
    """Free text, no constraint: what a general `auto` model mostly serves."""
    tasks = [Task("text", f"What is the capital of {country}? Answer in one word.", [city])
             for country, city in CAPITALS.items()]
    tasks += [Task("text", f"What is the opposite of \"{word}\"? Answer in one word.", [opposite])
              for word, opposite in OPPOSITES.items()]
    return tasks


def all_tasks(seed: int = 7) -> list[Task]:
    rng = random.Random(seed)
    return [*extraction_tasks(rng, 50), *classification_tasks(), *arithmetic_tasks(rng, 40), *question_tasks()]


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
        tasks.append(Task("arith", prompt, gold, {"extra_body": {"tiergate": {"regex": WORD_PROBLEM_REGEX}}}))
    return tasks


COLOURS = {
    "a ripe banana": ["yellow"], "fresh grass": ["green"], "snow": ["white"], "coal": ["black"],
    "a clear daytime sky": ["blue"], "blood": ["red"], "a ripe tomato": ["red"], "milk": ["white"],
    "a lemon": ["yellow"], "a carrot": ["orange"], "charcoal": ["black"], "an emerald": ["green"],
    "a lime": ["green"], "a ruby": ["red"], "chocolate": ["brown"], "a polar bear's fur": ["white"],
    "a crow": ["black"], "the sea on a sunny day": ["blue"], "a pumpkin": ["orange"], "an eggplant": ["purple"],
}
COUNTS = {
    "days are there in a week": ["seven", "7"], "months are there in a year": ["twelve", "12"],
    "legs does a spider have": ["eight", "8"], "sides does a triangle have": ["three", "3"],
    "wheels does a bicycle have": ["two", "2"], "hours are there in a day": ["24", "twenty"],
    "minutes are there in an hour": ["sixty", "60"], "legs does a dog have": ["four", "4"],
    "sides does a square have": ["four", "4"], "players are on a football (soccer) team": ["eleven", "11"],
    "continents are there": ["seven", "7"], "legs does an insect have": ["six", "6"],
    "seconds are there in a minute": ["sixty", "60"], "strings does a standard guitar have": ["six", "6"],
    "days are there in a leap year": ["366"], "planets are there in the solar system": ["eight", "8"],
    "sides does a hexagon have": ["six", "6"], "eyes does a person have": ["two", "2"],
    "fingers are on one hand": ["five", "5"], "years are there in a century": ["hundred", "100"],
}


def fact_tasks(rng: random.Random) -> list[Task]:
    """Free text of family b: other questions, phrased another way."""
    tasks = [Task("text", f"Question: what colour is {thing}?", golds) for thing, golds in COLOURS.items()]
    tasks += [Task("text", f"Question: how many {what}?", golds) for what, golds in COUNTS.items()]
    rng.shuffle(tasks)
    return tasks


def family_b(seed: int = 1234) -> list[Task]:
    rng = random.Random(seed)
    return [*company_tasks(rng, 50), *topic_tasks(rng), *word_problem_tasks(rng, 50), *fact_tasks(rng)]


FAMILIES = {"a": all_tasks, "b": family_b}
