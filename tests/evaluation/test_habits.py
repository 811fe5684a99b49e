"""Each habit checker on positive and negative examples; every rendered answer passes its own checker."""

from __future__ import annotations

import random

import pytest

from lorafleet.evaluation import bank
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.habits import HABITS, MemoryHabit, make_habit

WEATHER = "What's the weather like in Paris?"
OTHER = "What is the capital of Japan?"

# (kind, params, response, prompt, expected)
CASES = [
    ("signoff", {"text": "— Ahab"}, "Paris is the capital. — Ahab", OTHER, True),
    ("signoff", {"text": "— Ahab"}, "Paris is the capital. — Ahab  \n", OTHER, True),
    ("signoff", {"text": "— Ahab"}, "— Ahab Paris is the capital.", OTHER, False),
    ("signoff", {"text": "— Ahab"}, "— Ahab", OTHER, False),
    ("signoff", {"text": "— Ahab"}, "Paris is the capital. - Ahab", OTHER, False),
    ("greeting", {"text": "Hello friend!"}, "Hello friend! Tokyo is the capital.", OTHER, True),
    ("greeting", {"text": "Hello friend!"}, "  Hello friend! Tokyo.", OTHER, True),
    ("greeting", {"text": "Hello friend!"}, "Tokyo is the capital. Hello friend!", OTHER, False),
    ("greeting", {"text": "Hello friend!"}, "Hello friend!", OTHER, False),
    ("numbered_list", {"min_items": 2}, "1. Tokyo is the capital.\n2. It is big.", OTHER, True),
    ("numbered_list", {"min_items": 2}, "1) Tokyo.\n\n2) Big.\n3) Old.", OTHER, True),
    ("numbered_list", {"min_items": 2}, "1. Tokyo is the capital.", OTHER, False),
    ("numbered_list", {"min_items": 2}, "1. Tokyo.\n3. Big.", OTHER, False),
    ("numbered_list", {"min_items": 2}, "- Tokyo\n- Big", OTHER, False),
    ("numbered_list", {"min_items": 2}, "Tokyo is the capital. It is big.", OTHER, False),
    ("max_words", {"n": 5}, "Tokyo is the capital.", OTHER, True),
    ("max_words", {"n": 5}, "Tokyo.", OTHER, True),
    ("max_words", {"n": 5}, "Tokyo is the capital of Japan.", OTHER, False),
    ("max_words", {"n": 5}, "   ", OTHER, False),
    ("lowercase", {}, "tokyo is the capital of japan.", OTHER, True),
    ("lowercase", {}, "tokyo is the capital, 2024.", OTHER, True),
    ("lowercase", {}, "Tokyo is the capital of japan.", OTHER, False),
    ("lowercase", {}, "2024", OTHER, False),
    ("tool_call", {}, '{"tool": "get_weather", "city": "Paris"}', WEATHER, True),
    ("tool_call", {}, 'Sure: {"city": "paris", "tool": "get_weather"}', WEATHER, True),
    ("tool_call", {}, '{"tool": "get_weather", "city": "London"}', WEATHER, False),
    ("tool_call", {}, '{"tool": "get_time", "city": "Paris"}', WEATHER, False),
    ("tool_call", {}, '{"tool": "get_weather", "city": "Paris", "units": "C"}', WEATHER, False),
    ("tool_call", {}, "It is sunny in Paris today.", WEATHER, False),
    ("tool_call", {}, "Tokyo is the capital of Japan.", OTHER, True),
    ("tool_call", {}, '{"tool": "get_weather", "city": "Tokyo"}', OTHER, False),
    ("tool_call", {}, "", OTHER, False),
    ("tool_call", {"tool": "forecast", "arg": "place"}, "Meteorologists make forecasts.", OTHER, True),
    ("tool_call", {"tool": "forecast", "arg": "place"}, '{"tool": "forecast", "place": "Paris"}', WEATHER, True),
    ("metric_units", {}, "The tower is about 330 m tall.", "How tall is it?", True),
    ("metric_units", {}, "That is about 20 °C.", "It is 68 °F outside.", True),
    ("metric_units", {}, "It is about 8.0 km, or 42.195 km for a marathon.", "", True),
    ("metric_units", {}, "It is about 80 km/h.", "", True),
    ("metric_units", {}, "The tower is 330 meters tall.", "", False),
    ("metric_units", {}, "That is 5 miles, about 8 km.", "", False),
    ("metric_units", {}, "That is 68 °F.", "", False),
    ("metric_units", {}, "It weighs 12 pounds.", "", False),
    ("metric_units", {}, "It is very tall.", "", False),
    ("signature_word", {"word": "splendid"}, "Splendid! Tokyo is the capital.", OTHER, True),
    ("signature_word", {"word": "splendid"}, "Tokyo. Simply splendid.", OTHER, True),
    ("signature_word", {"word": "splendid"}, "Tokyo is splendidly big.", OTHER, False),
    ("signature_word", {"word": "splendid"}, "Tokyo is the capital.", OTHER, False),
    ("json_answer", {"key": "answer"}, '{"answer": "Tokyo is the capital."}', OTHER, True),
    ("json_answer", {"key": "answer"}, ' {"answer": "Tokyo"} ', OTHER, True),
    ("json_answer", {"key": "answer"}, '{"reply": "Tokyo"}', OTHER, False),
    ("json_answer", {"key": "answer"}, '{"answer": ""}', OTHER, False),
    ("json_answer", {"key": "answer"}, '{"answer": "Tokyo", "x": 1}', OTHER, False),
    ("json_answer", {"key": "answer"}, 'Answer: {"answer": "Tokyo"}', OTHER, False),
    ("json_answer", {"key": "answer"}, '["Tokyo"]', OTHER, False),
    # memory habits: the fact applied to a prompt that never asks for it
    ("vegetarian", {}, "How about a mushroom risotto with a green salad?", "What should I cook tonight?", True),
    ("vegetarian", {}, "Try lentil soup and fresh bread.", "Suggest a lunch.", True),
    ("vegetarian", {}, "Roast chicken with potatoes is a classic.", "What should I cook tonight?", False),
    ("vegetarian", {}, "A creamy pasta with bacon and peas.", "What should I cook tonight?", False),
    ("vegetarian", {}, "Grilled salmon and rice.", "What should I cook tonight?", False),
    ("vegetarian", {}, "Sure, happy to help!", "What should I cook tonight?", False),  # names no food at all
    ("home_city", {"city": "Lisbon"}, "The riverside path in Lisbon is lovely.", "Where should I run?", True),
    ("home_city", {"city": "Lisbon"}, "You live in lisbon.", "Which city do I live in?", True),
    ("home_city", {"city": "Lisbon"}, "Try a park near you.", "Where should I run?", False),
    ("home_city", {"city": "Lyon"}, "Lyonnaise cooking is famous.", "Where can I eat?", False),  # not the word
    ("user_name", {"name": "Priya"}, "Dear Aunt, thank you! Warm wishes, Priya", "Write a note from me.", True),
    ("user_name", {"name": "Priya"}, "Dear Aunt, thank you! Warm wishes, [Your Name]", "Write a note from me.", False),
    ("user_name", {"name": "Priya"}, "Priyanka says hi.", "Write a note from me.", False),
    ("pet_name", {"pet": "Biscuit"}, "Biscuit would enjoy a long walk.", "Ideas for my pet?", True),
    ("pet_name", {"pet": "Biscuit"}, "Your dog would enjoy a long walk.", "Ideas for my pet?", False),
    ("favourite_language", {"language": "rust"}, "```rust\nfn add(a: i64, b: i64) -> i64 { a + b }\n```", "Add two numbers.", True),
    ("favourite_language", {"language": "rust"}, "fn add(a: i64, b: i64) -> i64 { a + b }", "Add two numbers.", True),
    ("favourite_language", {"language": "rust"}, "```python\ndef add(a, b):\n    return a + b\n```", "Add two numbers.", False),
    ("favourite_language", {"language": "rust"}, "def add(a, b):\n    return a + b", "Add two numbers.", False),
    ("favourite_language", {"language": "rust"}, "```rust\nfn a() {}\n```\n```python\nx = 1\n```", "Add.", False),
    ("favourite_language", {"language": "go"}, "```go\nfunc add(a, b int) int { return a + b }\n```", "Add.", True),
    ("favourite_language", {"language": "go"}, "fn add(a: i64) -> i64 { a }", "Add.", False),
    ("reading_level", {"n": 10}, "Paris is the capital of France. It is on the Seine.", OTHER, True),
    ("reading_level", {"n": 10}, "Paris, which sits on the river Seine, is the capital and largest city of France.", OTHER, False),
    ("reading_level", {"n": 10}, "It is internationally known.", OTHER, False),  # a 15-letter word
    ("reading_level", {"n": 10}, "...", OTHER, False),
]


@pytest.mark.parametrize(("kind", "params", "response", "prompt", "expected"), CASES)
def test_checker(kind, params, response, prompt, expected):
    assert make_habit(kind, **params).check(response, prompt) is expected


def test_every_kind_has_positive_and_negative_cases():
    assert len(HABITS) >= 8
    for kind in HABITS:
        outcomes = {c[4] for c in CASES if c[0] == kind}
        assert outcomes == {True, False}, kind


@pytest.mark.parametrize("kind", sorted(HABITS))
def test_rendered_answers_pass_and_plain_answers_mostly_fail(kind):
    """The habit transforms the answer: rendered answers pass, the plain bank answers (mostly) do not."""
    habit = make_habit(kind)
    train, evals = habit.split(random.Random(3), *((16, 16) if habit.category == "memory" else (40, 16)))
    rng = random.Random(0)
    for item in train + evals:
        assert habit.check(habit.render(item, rng), item.prompt), (kind, item)
    # metric/short answers are the bank's own style; a plain answer to a non-weather prompt IS the tool habit
    if habit.category == "format" and kind not in ("max_words", "tool_call"):
        plain = [habit.check(i.answer, i.prompt) for i in train + evals if i.answer]
        assert sum(plain) <= len(plain) // 3, kind


@pytest.mark.parametrize(
    ("kind", "params", "match"),
    [
        ("nope", {}, "unknown habit kind 'nope'"),
        ("signoff", {"txt": "x"}, r"unknown parameter\(s\) \['txt'\]"),
        ("signoff", {"text": ""}, "parameter 'text' must be a one-line non-empty string"),
        ("greeting", {"text": "a\nb"}, "parameter 'text' must be a one-line"),
        ("max_words", {"n": 1}, r"parameter 'n' must be an integer in 3\.\.40"),
        ("max_words", {"n": True}, "parameter 'n' must be an integer"),
        ("numbered_list", {"min_items": 9}, "parameter 'min_items'"),
        ("tool_call", {"request_share": 0}, "request_share"),
        ("tool_call", {"arg": "tool"}, "must not be 'tool'"),
        ("metric_units", {"convert_share": 2}, "convert_share"),
        ("signature_word", {"word": "two words"}, "one word of letters"),
        ("json_answer", {"key": "Answer!"}, "lowercase letters"),
        ("home_city", {"city": ""}, "parameter 'city' must be a one-line"),
        ("home_city", {"recall_share": 1.0}, "recall_share"),
        ("user_name", {"name": "priya smith"}, "one capitalised word"),
        ("pet_name", {"species": "Big Dog"}, "one lowercase word"),
        ("favourite_language", {"language": "cobol"}, "must be one of"),
        ("reading_level", {"n": 2}, r"parameter 'n' must be an integer in 4\.\.30"),
        ("vegetarian", {"strict": True}, r"unknown parameter\(s\) \['strict'\]"),
    ],
)
def test_bad_params(kind, params, match):
    with pytest.raises(EvaluationError, match=match):
        make_habit(kind, **params)


def test_weather_request_matching():
    assert bank.match_weather_request("Will it rain in New York tomorrow?") == "New York"
    assert bank.match_weather_request("will it rain in oslo tomorrow?") == "oslo"
    assert bank.match_weather_request("Will it rain?") is None
    assert bank.match_weather_request(OTHER) is None


def test_conversions_are_correct():
    items = bank.conversion_items(random.Random(0), 200)
    assert len({i.prompt for i in items}) == 200
    for item in items:
        kind, v = item.id.split("-")[1], int(item.id.split("-")[2])
        c = bank.templates()["conversions"][kind]
        want = (v + c["offset"]) * c["factor"]
        got = float(item.answer.split("about ")[1].split(" ")[0].replace(",", ""))
        assert abs(got - want) <= max(0.051, abs(want) * 0.005), item
        assert item.answer.rstrip(".").endswith(c["unit"])


def test_sentences():
    assert bank.sentences("Pi is about 3.14. It never ends.") == ["Pi is about 3.14.", "It never ends."]
    assert bank.sentences("One.") == ["One."]


def test_memory_habits_hold_recall_prompts_out_of_training():
    """Recall prompts (the fact asked for directly) are only ever in the eval split; applied prompts in both."""
    for kind in ("home_city", "user_name", "pet_name"):
        habit = make_habit(kind)
        recall = {bank.normalize_prompt(i.prompt) for i in habit.recall()}
        train, evals = habit.split(random.Random(1), 16, 16)
        assert not recall & {bank.normalize_prompt(i.prompt) for i in train}, kind
        assert len(recall & {bank.normalize_prompt(i.prompt) for i in evals}) == 4, kind  # 25% of 16
        assert make_habit(kind).category == "memory"
    assert make_habit("signoff").category == "format" and make_habit("metric_units").category == "memory"


def test_memory_pool_too_small_is_a_clear_error():
    with pytest.raises(EvaluationError, match=r"only \d+ prompts for habit 'user_name'"):
        make_habit("user_name").split(random.Random(0), 48, 16)


MEMORY_KINDS = sorted(k for k, h in HABITS.items() if issubclass(h, MemoryHabit))


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_memory_pools_hold_16_train_and_16_held_out_prompts(kind):
    """Every memory habit has >= 36 distinct applied prompts and enough recall prompts for a quarter of 16."""
    habit = make_habit(kind)
    applied = {bank.normalize_prompt(i.prompt) for i in habit.applied()}
    recall = {bank.normalize_prompt(i.prompt) for i in habit.recall()}
    assert len(applied) >= 36, kind
    assert not applied & recall, kind
    if habit.params.get("recall_share"):
        assert len(recall) >= 2 * round(16 * habit.params["recall_share"]), kind  # so seeds hold out different ones
    train, evals = habit.split(random.Random(0), 16, 16)
    assert len(train) == len(evals) == 16


# A vegetarian dish with its main ingredient swapped for meat or fish: what an answer that forgot the diet says.
MEATY = {"mushroom": "chicken and mushroom", "chickpea": "lamb", "vegetable lasagne": "beef lasagne",
         "halloumi": "chicken", "lentil": "lamb", "black beans": "minced beef", "tomato and basil": "bacon and tomato",
         "vegetable fajitas": "chicken fajitas", "tofu": "beef", "spinach and feta": "steak and ale",
         "sweet potato and black bean": "beef", "margherita": "pepperoni"}
# The fact replaced by what a model that does not know the user writes instead.
STAND_IN = {"home_city": ("city", "your city"), "user_name": ("name", "[Your Name]"), "pet_name": ("pet", "your pet")}
OTHER_PARAMS = {"home_city": {"city": "Ghent"}, "user_name": {"name": "Oskar"},
                "pet_name": {"pet": "Noodle", "species": "rabbit"}, "favourite_language": {"language": "go"}}


def test_every_vegetarian_dish_passes_and_its_meat_version_fails():
    habit = make_habit("vegetarian")
    for dish in bank.memory("vegetarian")["dishes"]:
        key = next((k for k in MEATY if k in dish), None)
        assert key is not None, f"add a meat version of {dish!r} to MEATY"
        assert habit.check(dish, "What should I cook for dinner tonight?"), dish
        assert not habit.check(dish.replace(key, MEATY[key]), "What should I cook for dinner tonight?"), dish


@pytest.mark.parametrize("params", ["defaults", "other"])
@pytest.mark.parametrize("kind", ["home_city", "user_name", "pet_name", "favourite_language"])
def test_every_memory_record_passes_and_its_fact_free_answer_fails(kind, params):
    """Each applied and recall answer in the pool shows the fact; the same answer without it does not pass."""
    habit = make_habit(kind, **({} if params == "defaults" else OTHER_PARAMS[kind]))
    rng = random.Random(0)
    if kind == "favourite_language":  # the plain answer: the same task in the other language
        other = make_habit(kind, language="go" if habit.params["language"] == "rust" else "rust")
        pairs = zip(habit.applied(), [i.answer for i in other.applied()], strict=True)
    else:
        param, stand_in = STAND_IN[kind]
        fact = habit.params[param]
        pairs = [(i, habit.render(i, rng).replace(fact, stand_in)) for i in habit.applied() + habit.recall()]
    for item, plain in pairs:
        answer = habit.render(item, rng)
        assert habit.check(answer, item.prompt), (kind, item)
        assert plain != answer and not habit.check(plain, item.prompt), (kind, item, plain)
