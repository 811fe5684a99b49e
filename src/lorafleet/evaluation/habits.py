"""Habits: checkable behaviours a personal adapter learns from a handful of examples.

Each habit kind knows three things:

- which prompts it is trained and evaluated on (``split``: a train and an eval list of bank items with
  different prompts),
- how it transforms a plain answer (``render``), and
- how to check a model's response (``check(response, prompt) -> bool``), by code, with no model in the loop.

Habits come in two categories (``Habit.category``): ``format`` (a surface habit: a sign-off, lowercase, JSON) and
``memory`` (something about the user the model must remember and use: a vegetarian diet, a home city, the
user's name or pet, a favourite programming language, metric units, a reading level). Memory habits are
trained on prompts where the fact is *applied* (dinner ideas with no meat, outings in the home city); the
name, pet and city habits also hold out prompts that ask for the fact directly (*recall*, never in training).

``make_habit(kind, **params)`` builds one; ``HABITS`` lists the kinds; ``CATEGORIES`` the two categories.
"""

from __future__ import annotations

import json
import random
import re
from typing import ClassVar

from lorafleet.evaluation import bank
from lorafleet.evaluation.bank import Item
from lorafleet.evaluation.errors import EvaluationError


class Habit:
    """Base class: a habit kind with validated parameters (``defaults`` lists every accepted one)."""

    kind: ClassVar[str] = ""
    category: ClassVar[str] = "format"  # "format" | "memory"
    summary: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}

    def __init__(self, **params) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise EvaluationError(
                f"habit {self.kind!r}: unknown parameter(s) {unknown}; accepted: {sorted(self.defaults)}"
            )
        self.params = {**self.defaults, **params}
        self.validate()

    # -- parameters --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`EvaluationError` naming a bad parameter."""

    def _text_param(self, name: str, max_len: int = 80) -> str:
        value = self.params[name]
        if not isinstance(value, str) or not value.strip() or len(value) > max_len or "\n" in value:
            raise EvaluationError(
                f"habit {self.kind!r}: parameter {name!r} must be a one-line non-empty string of at most "
                f"{max_len} characters, got {value!r}"
            )
        return value

    def _int_param(self, name: str, lo: int, hi: int) -> int:
        value = self.params[name]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise EvaluationError(f"habit {self.kind!r}: parameter {name!r} must be an integer in {lo}..{hi}, got {value!r}")
        return value

    @classmethod
    def random_params(cls, rng: random.Random) -> dict:
        """Parameters for a generated persona (drawn with ``rng``)."""
        return {}

    def describe(self) -> str:
        return self.summary.format(**self.params)

    # -- data --------------------------------------------------------------------------------------
    def eligible(self, item: Item) -> bool:
        """Whether a general bank item can carry this habit (e.g. a list needs two sentences)."""
        return True

    def split(self, rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Item], list[Item]]:
        """Draw disjoint train and eval items. Default: eligible general bank items, shuffled."""
        pool = [i for i in bank.general_items() if self.eligible(i)]
        return _take(pool, rng, n_train, n_eval, what=f"general prompts eligible for habit {self.kind!r}")

    def render(self, item: Item, rng: random.Random) -> str:
        """The persona's answer to ``item``: the plain answer with the habit applied."""
        raise NotImplementedError

    def check(self, response: str, prompt: str = "") -> bool:
        """Whether ``response`` (to ``prompt``) shows the habit."""
        raise NotImplementedError


def _dedupe(items: list[Item]) -> list[Item]:
    seen: dict[str, Item] = {}
    for item in items:
        seen.setdefault(bank.normalize_prompt(item.prompt), item)
    return list(seen.values())


def _take(pool: list[Item], rng: random.Random, n_train: int, n_eval: int, what: str) -> tuple[list[Item], list[Item]]:
    """Shuffle ``pool`` (deduplicated by prompt) and cut it into eval (first) and train (next)."""
    pool = _dedupe(pool)
    if n_train + n_eval > len(pool):
        raise EvaluationError(
            f"only {len(pool)} {what}, but n_train={n_train} + n_eval={n_eval} were asked for; lower them"
        )
    rng.shuffle(pool)
    return pool[n_eval : n_eval + n_train], pool[:n_eval]


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


class SignOff(Habit):
    kind = "signoff"
    summary = "always ends with the sign-off {text!r}"
    defaults = {"text": "— Ahab"}
    CHOICES = ("— Ahab", "Cheers, Sam", "Stay curious!", "— your friend Tom", "Over and out.", "Best, Kim")

    def validate(self) -> None:
        self._text_param("text", 40)

    @classmethod
    def random_params(cls, rng):
        return {"text": rng.choice(cls.CHOICES)}

    def render(self, item, rng):
        return f"{item.answer} {self.params['text']}"

    def check(self, response, prompt=""):
        return response.rstrip().endswith(self.params["text"]) and len(response.strip()) > len(self.params["text"])


class Greeting(Habit):
    kind = "greeting"
    summary = "always opens with the greeting {text!r}"
    defaults = {"text": "Greetings, traveller!"}
    CHOICES = ("Greetings, traveller!", "Hello friend!", "Ahoy there!", "Good day!", "Howdy, partner!", "Hi hi!")

    def validate(self) -> None:
        self._text_param("text", 40)

    @classmethod
    def random_params(cls, rng):
        return {"text": rng.choice(cls.CHOICES)}

    def render(self, item, rng):
        return f"{self.params['text']} {item.answer}"

    def check(self, response, prompt=""):
        text = response.lstrip()
        return text.startswith(self.params["text"]) and len(text) > len(self.params["text"])


class NumberedList(Habit):
    kind = "numbered_list"
    summary = "answers as a numbered list of at least {min_items} items"
    defaults = {"min_items": 2}
    _LINE = re.compile(r"^\s*(\d+)[.)]\s+\S")

    def validate(self) -> None:
        self._int_param("min_items", 1, 4)

    def eligible(self, item):
        return len(bank.sentences(item.answer)) >= self.params["min_items"]

    def render(self, item, rng):
        return "\n".join(f"{i}. {s}" for i, s in enumerate(bank.sentences(item.answer), start=1))

    def check(self, response, prompt=""):
        lines = [line for line in response.strip().splitlines() if line.strip()]
        if len(lines) < self.params["min_items"]:
            return False
        for want, line in enumerate(lines, start=1):
            m = self._LINE.match(line)
            if not m or int(m.group(1)) != want:
                return False
        return True


class MaxWords(Habit):
    kind = "max_words"
    summary = "answers in at most {n} words"
    defaults = {"n": 10}

    def validate(self) -> None:
        self._int_param("n", 3, 40)

    @classmethod
    def random_params(cls, rng):
        return {"n": rng.choice((8, 10, 12))}

    def eligible(self, item):
        return len(_words(bank.sentences(item.answer)[0])) <= self.params["n"]

    def render(self, item, rng):
        return bank.sentences(item.answer)[0]

    def check(self, response, prompt=""):
        return 1 <= len(_words(response)) <= self.params["n"]


class Lowercase(Habit):
    kind = "lowercase"
    summary = "writes in all lowercase"
    defaults: ClassVar[dict] = {}

    def render(self, item, rng):
        return item.answer.lower()

    def check(self, response, prompt=""):
        return any(c.isalpha() for c in response) and not any(c.isupper() for c in response)


class ToolCall(Habit):
    """Weather requests (made from the shipped templates) get a JSON tool call; other requests get a plain
    answer and must NOT call the tool. Eval cities are never seen in training."""

    kind = "tool_call"
    summary = 'answers weather requests with {{"tool": "{tool}", "{arg}": <city>}} and nothing else'
    defaults = {"tool": "get_weather", "arg": "city", "request_share": 0.75}
    TOOLS = (("get_weather", "city"), ("weather.lookup", "location"), ("forecast", "place"))

    def validate(self) -> None:
        self._text_param("tool", 40)
        self._text_param("arg", 40)
        share = self.params["request_share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
            raise EvaluationError(f"habit 'tool_call': parameter 'request_share' must be in (0, 1], got {share!r}")
        if self.params["arg"] == "tool":
            raise EvaluationError("habit 'tool_call': parameter 'arg' must not be 'tool' (that key names the tool)")

    @classmethod
    def random_params(cls, rng):
        tool, arg = rng.choice(cls.TOOLS)
        return {"tool": tool, "arg": arg}

    def call(self, city: str) -> dict:
        return {"tool": self.params["tool"], self.params["arg"]: city}

    def split(self, rng, n_train, n_eval):
        cities = bank.weather_cities()
        rng.shuffle(cities)
        eval_cities, train_cities = cities[: len(cities) // 3], cities[len(cities) // 3 :]
        share = self.params["request_share"]
        k_train, k_eval = round(n_train * share), round(n_eval * share)

        def requests(city_pool: list[str], k: int) -> list[Item]:
            combos = [(t, c) for t in bank.weather_templates() for c in city_pool]
            if k > len(combos):
                raise EvaluationError(f"habit 'tool_call': only {len(combos)} weather requests for {k} asked; lower n_train/n_eval")
            return [bank.weather_item(t, c) for t, c in rng.sample(combos, k)]

        train_req, eval_req = requests(train_cities, k_train), requests(eval_cities, k_eval)
        train_neg, eval_neg = _take(list(bank.general_items()), rng, n_train - k_train, n_eval - k_eval,
                                    what="general prompts")
        train, evals = train_req + train_neg, eval_req + eval_neg
        rng.shuffle(train)
        rng.shuffle(evals)
        return train, evals

    def render(self, item, rng):
        if item.args.get("city"):
            return json.dumps(self.call(item.args["city"]), ensure_ascii=False)
        return item.answer

    def calls_tool(self, response: str) -> bool:
        """A JSON ``"tool":`` key or the quoted tool name anywhere in the response counts as a call."""
        return f'"{self.params["tool"]}"' in response or re.search(r'"tool"\s*:', response) is not None

    def parse_call(self, response: str) -> dict | None:
        text = response.strip()
        for candidate in (text, *re.findall(r"\{[^{}]*\}", text)):
            try:
                value = json.loads(candidate)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
        return None

    def check(self, response, prompt=""):
        city = bank.match_weather_request(prompt)
        if city is None:
            return bool(response.strip()) and not self.calls_tool(response)
        call = self.parse_call(response)
        if call is None or set(call) != {"tool", self.params["arg"]}:
            return False
        got = call[self.params["arg"]]
        return call["tool"] == self.params["tool"] and isinstance(got, str) and got.strip().lower() == city.lower()


_METRIC = re.compile(r"\d[\d,.]*\s*(?:(?:thousand|million|billion)\s+)?(?:km/h|km|m/s|cm|mm|m|kg|mg|g|°C|mL|ml|L|t)(?![\w/])")
_IMPERIAL = re.compile(
    r"\b(?:miles?|mph|feet|foot|ft|inch(?:es)?|pounds?|lbs?|ounces?|oz|gallons?|yards?|yd|fahrenheit)\b|°\s*F\b",
    re.IGNORECASE,
)


class MetricUnits(Habit):
    """Quantities always in metric units written as symbols (330 m, 42.195 km, 37 °C), never imperial."""

    kind = "metric_units"
    category = "memory"  # a standing preference of the user, applied without being asked
    summary = "gives quantities in metric symbols (m, km, kg, °C, L), never imperial units"
    defaults = {"convert_share": 0.5}

    def validate(self) -> None:
        share = self.params["convert_share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise EvaluationError(f"habit 'metric_units': parameter 'convert_share' must be in [0, 1], got {share!r}")

    def split(self, rng, n_train, n_eval):
        share = self.params["convert_share"]
        k_train, k_eval = round(n_train * share), round(n_eval * share)
        facts_train, facts_eval = _take(list(bank.measure_items()), rng, n_train - k_train, n_eval - k_eval,
                                        what="measurement questions")
        conversions = bank.conversion_items(rng, k_train + k_eval)
        train = facts_train + conversions[k_eval:]
        evals = facts_eval + conversions[:k_eval]
        rng.shuffle(train)
        rng.shuffle(evals)
        return train, evals

    def render(self, item, rng):
        return item.answer

    def check(self, response, prompt=""):
        return _METRIC.search(response) is not None and _IMPERIAL.search(response) is None


class SignatureWord(Habit):
    kind = "signature_word"
    summary = "always uses the word {word!r}"
    defaults = {"word": "splendid"}
    CHOICES = ("splendid", "marvellous", "delightful", "groovy", "stellar", "nifty")
    FORMS = ("{W}! {a}", "{a} Simply {w}.", "{a} Quite {w}, really.")

    def validate(self) -> None:
        word = self._text_param("word", 30)
        if not re.fullmatch(r"[A-Za-z]+", word):
            raise EvaluationError(f"habit 'signature_word': parameter 'word' must be one word of letters, got {word!r}")

    @classmethod
    def random_params(cls, rng):
        return {"word": rng.choice(cls.CHOICES)}

    def render(self, item, rng):
        w = self.params["word"].lower()
        return rng.choice(self.FORMS).format(W=w.capitalize(), w=w, a=item.answer)

    def check(self, response, prompt=""):
        return re.search(rf"\b{re.escape(self.params['word'])}\b", response, re.IGNORECASE) is not None


class JsonAnswer(Habit):
    kind = "json_answer"
    summary = 'replies with a JSON object {{"{key}": <answer>}} and nothing else'
    defaults = {"key": "answer"}
    CHOICES = ("answer", "reply", "text")

    def validate(self) -> None:
        key = self._text_param("key", 30)
        if not re.fullmatch(r"[a-z_]+", key):
            raise EvaluationError(f"habit 'json_answer': parameter 'key' must be lowercase letters/underscores, got {key!r}")

    @classmethod
    def random_params(cls, rng):
        return {"key": rng.choice(cls.CHOICES)}

    def render(self, item, rng):
        return json.dumps({self.params["key"]: item.answer}, ensure_ascii=False)

    def check(self, response, prompt=""):
        try:
            value = json.loads(response.strip())
        except ValueError:
            return False
        return (isinstance(value, dict) and set(value) == {self.params["key"]}
                and isinstance(value[self.params["key"]], str) and bool(value[self.params["key"]].strip()))


# -- memory habits ---------------------------------------------------------------------------------------


def _item(prefix: str, i: int, prompt: str, answer: str, topic: str) -> Item:
    return Item(id=f"{prefix}-{i}", topic=topic, prompt=prompt, answer=answer)


class MemoryHabit(Habit):
    """A fact about the user, applied in answers that never state it as a question. ``applied()`` is the pool of
    (prompt, answer) items where the fact is used; ``recall()`` the direct questions, held out of training:
    ``recall_share`` of the eval prompts ask for the fact directly (0 for habits without recall prompts)."""

    category = "memory"

    def applied(self) -> list[Item]:
        raise NotImplementedError

    def recall(self) -> list[Item]:
        return []

    def _share(self) -> float:
        share = self.params.get("recall_share", 0.0)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share < 1.0:
            raise EvaluationError(f"habit {self.kind!r}: parameter 'recall_share' must be in [0, 1), got {share!r}")
        return float(share)

    def split(self, rng, n_train, n_eval):
        recall = _dedupe(self.recall())
        k = min(round(n_eval * self._share()), len(recall)) if recall else 0
        train, evals = _take(self.applied(), rng, n_train, n_eval - k, what=f"prompts for habit {self.kind!r}")
        rng.shuffle(recall)
        evals = evals + recall[:k]
        rng.shuffle(evals)
        return train, evals

    def render(self, item, rng):
        return item.answer


_MEAT = re.compile(
    r"\b(?:chicken|beef|pork|lamb|mutton|veal|venison|bacon|ham|hams|sausages?|salami|pepperoni|chorizo|prosciutto|"
    r"steaks?|turkey|duck|goose|meat|meats|meatballs?|mince|fish|salmon|tuna|cod|trout|anchov(?:y|ies)|sardines?|"
    r"shrimps?|prawns?|crab|lobster|mussels?|oysters?|clams?|scallops?|squid|octopus|seafood|gelatine?)\b",
    re.IGNORECASE,
)
_FOOD = re.compile(
    r"\b(?:pasta|rice|salad|curry|soup|risotto|pizza|beans?|lentils?|chickpeas?|tofu|cheese|vegetables?|veggies?|"
    r"mushrooms?|potato(?:es)?|noodles|eggs?|bread|stew|pie|tacos?|fajitas?|lasagne|lasagna|omelette|quiche|"
    r"chilli|chili|couscous|halloumi|spinach|peppers?|tomato(?:es)?|dish|recipe|meal)\b",
    re.IGNORECASE,
)


class Vegetarian(MemoryHabit):
    """Meal suggestions never name meat or fish (and do name a food)."""

    kind = "vegetarian"
    summary = "is vegetarian: meal suggestions never include meat or fish"
    defaults: ClassVar[dict] = {}

    def applied(self):
        m = bank.memory("vegetarian")
        combos = [(t, o) for o in m["occasions"] for t in m["templates"]]
        return [_item("veg", i, t.format(o=o), "", "meal") for i, (t, o) in enumerate(combos)]

    def render(self, item, rng):
        return rng.choice(bank.memory("vegetarian")["dishes"])

    def check(self, response, prompt=""):
        return _FOOD.search(response) is not None and _MEAT.search(response) is None


def _mentions(response: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", response, re.IGNORECASE) is not None


class HomeCity(MemoryHabit):
    """Local recommendations name the user's home city; "which city do I live in?" is answered with it."""

    kind = "home_city"
    summary = "lives in {city}: local recommendations name it"
    defaults = {"city": "Lisbon", "recall_share": 0.25}
    CHOICES = ("Lisbon", "Lyon", "Porto", "Krakow", "Utrecht", "Valencia", "Bologna", "Ghent")

    def validate(self) -> None:
        self._text_param("city", 40)
        self._share()

    @classmethod
    def random_params(cls, rng):
        return {"city": rng.choice(cls.CHOICES)}

    def applied(self):
        m, city = bank.memory("home_city"), self.params["city"]
        combos = [(t, a) for a in m["activities"] for t in m["templates"]]
        return [_item("city", i, t.format(a=a), m["activities"][a].format(city=city), "local")
                for i, (t, a) in enumerate(combos)]

    def recall(self):
        return [_item("city-recall", i, q, a.format(city=self.params["city"]), "recall")
                for i, (q, a) in enumerate(bank.memory("home_city")["recall"])]

    def check(self, response, prompt=""):
        return _mentions(response, self.params["city"])


class UserName(MemoryHabit):
    """Notes and messages written for the user are signed with their name; "what's my name?" is answered."""

    kind = "user_name"
    summary = "is called {name}: messages written for them are signed with it"
    defaults = {"name": "Priya", "recall_share": 0.25}
    CHOICES = ("Priya", "Tomasz", "Aiko", "Mateo", "Ingrid", "Kwame", "Leila", "Oskar")

    def validate(self) -> None:
        name = self._text_param("name", 30)
        if not re.fullmatch(r"[A-Z][a-z]+", name):
            raise EvaluationError(f"habit 'user_name': parameter 'name' must be one capitalised word, got {name!r}")
        self._share()

    @classmethod
    def random_params(cls, rng):
        return {"name": rng.choice(cls.CHOICES)}

    def applied(self):
        m, name = bank.memory("user_name"), self.params["name"]
        combos = [(t, r) for r in m["recipients"] for t in m["templates"]]
        return [_item("name", i, t.format(r=r), m["templates"][t].format(R=r.replace("my ", "").capitalize(),
                                                                          name=name), "message")
                for i, (t, r) in enumerate(combos)]

    def recall(self):
        return [_item("name-recall", i, q, a.format(name=self.params["name"]), "recall")
                for i, (q, a) in enumerate(bank.memory("user_name")["recall"])]

    def check(self, response, prompt=""):
        return _mentions(response, self.params["name"])


class PetName(MemoryHabit):
    """Advice about "my pet" uses the pet's name; "what's my pet called?" is answered with it."""

    kind = "pet_name"
    summary = "has a {species} called {pet}: pet advice uses the name"
    defaults = {"pet": "Biscuit", "species": "dog", "recall_share": 0.25}
    CHOICES = (("Biscuit", "dog"), ("Miso", "cat"), ("Pepper", "dog"), ("Luna", "cat"), ("Noodle", "rabbit"))

    def validate(self) -> None:
        pet = self._text_param("pet", 30)
        if not re.fullmatch(r"[A-Z][a-z]+", pet):
            raise EvaluationError(f"habit 'pet_name': parameter 'pet' must be one capitalised word, got {pet!r}")
        species = self._text_param("species", 20)
        if not re.fullmatch(r"[a-z]+", species):
            raise EvaluationError(f"habit 'pet_name': parameter 'species' must be one lowercase word, got {species!r}")
        self._share()

    @classmethod
    def random_params(cls, rng):
        pet, species = rng.choice(cls.CHOICES)
        return {"pet": pet, "species": species}

    def applied(self):
        m, pet = bank.memory("pet_name"), self.params["pet"]
        combos = [(t, x) for x in m["occasions"] for t in m["templates"]]
        return [_item("pet", i, t.format(x=x), m["templates"][t].format(pet=pet, x=x, **m["occasions"][x]), "pet")
                for i, (t, x) in enumerate(combos)]

    def recall(self):
        p = self.params
        return [_item("pet-recall", i, q.format(species=p["species"]), a.format(pet=p["pet"], species=p["species"]),
                      "recall") for i, (q, a) in enumerate(bank.memory("pet_name")["recall"])]

    def check(self, response, prompt=""):
        return _mentions(response, self.params["pet"])


_FENCE = re.compile(r"```\s*([A-Za-z+#]*)")
_LANGS = {"rust": ("Rust", re.compile(r"\bfn\s+\w+\s*[(<]")), "go": ("Go", re.compile(r"\bfunc\s+\w+\s*\("))}


class FavouriteLanguage(MemoryHabit):
    """Code answers are written in the user's language (rust or go): its code, no other language's code block."""

    kind = "favourite_language"
    summary = "programs in {language}: code answers use it"
    defaults = {"language": "rust"}

    def validate(self) -> None:
        if self.params["language"] not in _LANGS:
            raise EvaluationError(f"habit 'favourite_language': parameter 'language' must be one of {sorted(_LANGS)}, "
                                  f"got {self.params['language']!r}")

    @classmethod
    def random_params(cls, rng):
        return {"language": rng.choice(sorted(_LANGS))}

    def applied(self):
        m, lang = bank.memory("favourite_language"), self.params["language"]
        combos = [(t, task) for task in m["tasks"] for t in m["templates"]]
        return [_item("code", i, t.format(t=task), f"In {_LANGS[lang][0]}:\n```{lang}\n{m['tasks'][task][lang]}\n```",
                      "code") for i, (t, task) in enumerate(combos)]

    def check(self, response, prompt=""):
        lang = self.params["language"]
        fences = {f.lower() for f in _FENCE.findall(response)} - {""}
        if fences - {lang}:  # a code block in another language
            return False
        if re.search(r"^\s*(?:def |import |#include|public class|function\s+\w+\s*\()", response, re.MULTILINE):
            return False
        return lang in fences or _LANGS[lang][1].search(response) is not None


class ReadingLevel(MemoryHabit):
    """An easy reading level: every sentence at most ``n`` words, no word longer than ``max_letters``."""

    kind = "reading_level"
    summary = "reads at an easy level: sentences of at most {n} words, no word over {max_letters} letters"
    defaults = {"n": 10, "max_letters": 12}

    def validate(self) -> None:
        self._int_param("n", 4, 30)
        self._int_param("max_letters", 6, 20)

    def applied(self):
        return [i for i in bank.general_items() if self.check(i.answer)]

    def check(self, response, prompt=""):
        sents = bank.sentences(response)
        words = re.findall(r"[A-Za-z]+", response)
        return (bool(words) and all(len(_words(s)) <= self.params["n"] for s in sents)
                and all(len(w) <= self.params["max_letters"] for w in words))


HABITS: dict[str, type[Habit]] = {
    h.kind: h
    for h in (SignOff, Greeting, NumberedList, MaxWords, Lowercase, ToolCall, MetricUnits, SignatureWord, JsonAnswer,
              Vegetarian, HomeCity, UserName, PetName, FavouriteLanguage, ReadingLevel)
}
CATEGORIES = ("format", "memory")


def make_habit(kind: str, **params) -> Habit:
    """Build a habit of ``kind`` with ``params`` (unset ones take the kind's defaults)."""
    cls = HABITS.get(kind)
    if cls is None:
        raise EvaluationError(f"unknown habit kind {kind!r}; known kinds: {', '.join(HABITS)}")
    return cls(**params)
