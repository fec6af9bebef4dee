"""Write sample.jsonl: 71 Open-Orca-format rows written for lmforge (quickstart and smoke runs).

The rows are original: templated arithmetic and geometry with worked answers, capitals,
sentiment, short explanations, summaries and sorting. Run it to regenerate the file.
"""

from pathlib import Path
import json
import random

rng = random.Random(1234)
SYSTEMS = [
    "",
    "You are a helpful assistant who always explains the answer.",
    "You are an AI assistant. Complete the user's task faithfully and think step by step.",
    "You are a patient teacher. Explain your answer as if to a five year old.",
    "You are an AI assistant that follows instructions exactly. Keep answers short.",
]
rows = []
def add(q, r, sys=None):
    rows.append({"id": f"lmforge-sample.{len(rows):04d}", "system_prompt": SYSTEMS[rng.randrange(len(SYSTEMS))] if sys is None else sys, "question": q, "response": r})

names = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
items = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells"]
for i in range(24):
    n, it = names[i % len(names)], items[i % len(items)]
    a = rng.randint(12, 60); b = rng.randint(2, a // 2); c = rng.randint(1, 9)
    q = f"{n} has {a} {it}. {n} gives {b} of them to a friend and then buys {c} more. How many {it} does {n} have now? Show your reasoning step by step."
    r = (f"Step 1: {n} starts with {a} {it}.\n"
         f"Step 2: After giving away {b}, {n} has {a} - {b} = {a - b} {it}.\n"
         f"Step 3: After buying {c} more, {n} has {a - b} + {c} = {a - b + c} {it}.\n"
         f"So {n} has {a - b + c} {it} now.")
    add(q, r, SYSTEMS[2])
for i in range(12):
    w = rng.randint(3, 12); h = rng.randint(3, 12)
    add(f"A rectangle is {w} cm wide and {h} cm tall. What is its area and its perimeter?",
        f"The area is width times height: {w} x {h} = {w*h} square centimetres. "
        f"The perimeter is twice the sum of the sides: 2 x ({w} + {h}) = {2*(w+h)} centimetres.")
capitals = [("France", "Paris"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
            ("Kenya", "Nairobi"), ("Brazil", "Brasilia"), ("Egypt", "Cairo"), ("Norway", "Oslo"),
            ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Italy", "Rome"), ("Peru", "Lima")]
for country, city in capitals:
    add(f"What is the capital of {country}? Answer in one sentence.", f"The capital of {country} is {city}.", SYSTEMS[4])
reviews = [
    ("The battery lasts all day and the screen is bright and sharp.", "positive"),
    ("It stopped working after two days and support never replied.", "negative"),
    ("The soup was cold and the waiter ignored us for half an hour.", "negative"),
    ("A warm, funny film with a cast that clearly enjoyed making it.", "positive"),
    ("The instructions were confusing and two screws were missing.", "negative"),
    ("Fast delivery, solid build, and it does exactly what it promises.", "positive"),
    ("The hotel room was spotless and the staff were very kind.", "positive"),
    ("Too loud, too slow, and far too expensive for what it is.", "negative"),
]
for text, label in reviews:
    add(f"Is the sentiment of the following review positive or negative?\nReview: {text}",
        f"The sentiment is {label}. " + ("The reviewer praises the product or experience." if label == "positive" else "The reviewer complains about problems with the product or experience."),
        SYSTEMS[1])
facts = [
    ("Why do we see lightning before we hear thunder?", "Light travels much faster than sound. Light covers the distance almost instantly, while sound moves at about 343 metres per second in air, so the thunder arrives later."),
    ("What does a plant need for photosynthesis?", "A plant needs sunlight, water and carbon dioxide. Using the energy of light, it turns water and carbon dioxide into sugar and releases oxygen."),
    ("Why does ice float on water?", "Ice is less dense than liquid water. When water freezes, its molecules form an open crystal structure that takes up more space, so ice floats."),
    ("What is the difference between weather and climate?", "Weather is the state of the air on a given day, such as rain or sunshine. Climate is the average pattern of weather in a region over many years."),
    ("How many minutes are there in a day? Explain.", "A day has 24 hours and each hour has 60 minutes, so a day has 24 x 60 = 1440 minutes."),
    ("Why do we have seasons on Earth?", "Earth's axis is tilted. As Earth orbits the Sun, each hemisphere leans toward the Sun for part of the year and away from it for another part, which changes how much sunlight it receives."),
]
for q, r in facts:
    add(q, r)
summaries = [
    ("The town council met on Monday to discuss the new bicycle lanes. Most members supported the plan because it would make roads safer for children, but some worried about losing parking spaces for shops.",
     "The town council discussed new bicycle lanes, which most members supported for safety while some feared losing parking for shops."),
    ("Researchers tested a new battery that charges in ten minutes. It kept most of its capacity after a thousand charges, but it still costs more to produce than current batteries.",
     "A new battery charges in ten minutes and lasts a thousand cycles, but it is still more expensive to make."),
    ("After weeks of rain, the river rose above its banks and flooded several farms. Volunteers filled sandbags to protect the village, and the water began to fall on Sunday.",
     "Weeks of rain flooded farms near the river, volunteers protected the village with sandbags, and the water began to fall on Sunday."),
]
for text, summary in summaries:
    add(f"Summarize the following text in one sentence:\n{text}", summary, SYSTEMS[4])
for i in range(6):
    words = rng.sample(["river", "lamp", "garden", "cloud", "window", "violin", "harbor", "pepper", "mountain", "ticket"], 4)
    add("Sort these words in alphabetical order and list them separated by commas: " + ", ".join(words) + ".", ", ".join(sorted(words)) + ".", SYSTEMS[4])
rng.shuffle(rows)
for i, row in enumerate(rows):
    row["id"] = f"lmforge-sample.{i:04d}"
with open(Path(__file__).with_name("sample.jsonl"), "w") as f:
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
print(len(rows))
