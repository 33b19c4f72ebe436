"""Small built-in text sets: ordinary sentences and paraphrase pairs.

Background
----------
Offline experiments need inputs that are not random token ids. These are 40
ordinary English sentences (everyday topics, 6-20 words, most ending in a full
stop, some with commas or a question mark) and 20 paraphrase pairs (the same
meaning in different words). They are the default inputs of the MiniLM
reproduction of the paper's zero-vs-mean result
(:func:`massact_lens.evaluate.ablation_table`), of the tests, and of the README
commands. Written for this project; no licence restrictions.

Usage
-----
>>> from massact_lens.examples.sentences import SENTENCES, PARAPHRASE_PAIRS
>>> len(SENTENCES), len(PARAPHRASE_PAIRS)
(40, 20)
>>> PARAPHRASE_PAIRS[0]
('The meeting was moved to next Tuesday.', 'They rescheduled the meeting for next Tuesday.')

References
----------
Sun, Chen, Kolter, Liu. *Massive Activations in Large Language Models*, COLM 2024,
Table 3 (the zero-vs-mean ablation these sets are used to reproduce).
"""

from __future__ import annotations

__all__ = ["PARAPHRASE_PAIRS", "SENTENCES"]

#: Forty ordinary sentences, one idea each.
SENTENCES: tuple[str, ...] = (
    "The cat slept on the warm windowsill all afternoon.",
    "She forgot her umbrella, so she got soaked on the way home.",
    "The train to the city leaves every twenty minutes.",
    "He planted tomatoes and beans in the small garden behind the house.",
    "Our neighbours are painting their fence a bright shade of blue.",
    "The library closes early on Sundays.",
    "I need to buy milk, eggs and bread before the shop closes.",
    "The children built a sandcastle near the edge of the water.",
    "Heavy snow blocked the mountain road for two days.",
    "My grandmother bakes the best apple pie in the village.",
    "The museum opened a new exhibition about ancient Egypt.",
    "Can you tell me where the nearest pharmacy is?",
    "The football match was cancelled because of the storm.",
    "He practises the piano for an hour every evening.",
    "The new bridge will shorten the drive to the airport.",
    "A small dog was barking at the postman.",
    "They spent their holiday hiking in the hills of Scotland.",
    "The soup needs a little more salt.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The meeting ran late, and everyone missed their bus.",
    "She reads a chapter of her novel before going to sleep.",
    "The price of coffee has risen sharply this year.",
    "Please switch off the lights when you leave the room.",
    "The old castle on the hill attracts thousands of tourists.",
    "My brother repairs bicycles in his spare time.",
    "The river flooded the fields after weeks of rain.",
    "We watched the sunset from the top of the tower.",
    "The teacher asked the students to hand in their essays on Friday.",
    "A strong wind knocked over the garden chairs.",
    "The bakery on the corner sells fresh bread every morning.",
    "He lost his keys somewhere between the office and the car park.",
    "The concert hall was full for the final performance.",
    "Doctors recommend drinking plenty of water in hot weather.",
    "The company hired twenty new engineers last month.",
    "Our flight was delayed by three hours.",
    "She painted a portrait of her father for his birthday.",
    "The farmers are worried about the lack of rain this summer.",
    "The restaurant serves fish caught the same morning.",
    "It took them a week to move into the new flat.",
    "The volunteers cleaned up the beach on Saturday.",
)

#: Twenty paraphrase pairs: two wordings of one meaning.
PARAPHRASE_PAIRS: tuple[tuple[str, str], ...] = (
    ("The meeting was moved to next Tuesday.", "They rescheduled the meeting for next Tuesday."),
    ("The shop is closed on public holidays.", "On public holidays the store does not open."),
    ("He is learning to speak Spanish.", "He is studying the Spanish language."),
    ("The film was extremely boring.", "The movie was really dull."),
    ("She arrived at the station just in time.", "She got to the station at the last moment."),
    ("It is going to rain tomorrow.", "Tomorrow there will be rain."),
    ("The car would not start this morning.", "This morning the car refused to start."),
    ("My sister works as a nurse in a large hospital.", "My sister is a nurse at a big hospital."),
    ("The concert was sold out within an hour.", "All the concert tickets were gone in an hour."),
    ("Please close the door behind you.", "Shut the door after you, please."),
    ("The children were tired after the long walk.", "After the long walk the kids were exhausted."),
    ("This book is very hard to understand.", "It is difficult to make sense of this book."),
    ("The company reported higher profits this year.", "This year the firm earned more money."),
    ("He quit his job to travel around the world.", "He left his job so he could see the world."),
    ("The road was blocked by a fallen tree.", "A tree had fallen across the road and blocked it."),
    ("We should leave early to avoid the traffic.", "Let us set off early so we miss the traffic."),
    ("The soup is too hot to eat.", "The soup is so hot that you cannot eat it yet."),
    ("Our team won the match easily.", "We beat the other team without much effort."),
    ("The museum is free on the first Sunday of each month.", "Entry to the museum costs nothing on the first Sunday of the month."),
    ("She has lived in this town since she was a child.", "She has been living here in this town since childhood."),
)
