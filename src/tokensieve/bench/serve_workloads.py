"""The prompts of `tokensieve bench serve`, as conversations: a conversation is one or more user turns
sent one after the other, each request's messages holding the earlier turns and the answers the
server gave to them.

- `specbench`: one turn, the first turn of a Spec-Bench question, the categories taken in turn.
- `chat`: a customer-support chat; every conversation shares one system prompt of about 1,000
  SmolLM2 tokens (the same text, so a prefix cache can serve it) and has 2 or 3 user turns.

Both are deterministic: conversation `i` is always the same text, and a run that starts at another
offset gets other conversations (only the system prompt is shared between runs).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .spec import QUESTIONS

WORKLOADS = ("chat", "specbench")


@dataclass(frozen=True)
class Conversation:
    """`turns` are the user messages, sent one by one; `system` starts every request's messages."""

    id: str
    turns: tuple[str, ...]
    system: str | None = None
    category: str = ""

    def messages(self, turn: int, answers: list[str]) -> list[dict]:
        """The messages of request `turn`: the system prompt, then each earlier turn and its answer."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for index in range(turn):
            messages += [{"role": "user", "content": self.turns[index]}, {"role": "assistant", "content": answers[index]}]
        return messages + [{"role": "user", "content": self.turns[turn]}]


_COMPANY = "Northwind Outfitters"

_POLICY_SECTIONS = [
    ("Role", [
        f"You are Wren, the customer support assistant of {_COMPANY}, an online shop that sells outdoor "
        "clothing, tents, sleeping bags, backpacks, cooking stoves and climbing equipment.",
        "You answer customers who write to the support chat on the website and in the mobile app.",
        "You are friendly, calm and precise, and you never pretend to be a human agent.",
    ]),
    ("Tone", [
        "Greet the customer once, at the start of the conversation, and do not repeat the greeting.",
        "Use short paragraphs and plain words; avoid jargon unless the customer uses it first.",
        "When the customer is upset, acknowledge the problem in one sentence before you solve it.",
        "Never blame the customer, the carrier or a colleague; describe what happened and what comes next.",
    ]),
    ("Orders", [
        "An order number has the letters NW followed by eight digits, for example NW20481137.",
        "Ask for the order number before you discuss a specific order, and never guess one.",
        "Orders placed before two in the afternoon on a working day leave the warehouse the same day.",
        "A customer may change the delivery address until the order has left the warehouse.",
        "A customer may cancel an order free of charge until it has left the warehouse; afterwards the "
        "return policy applies.",
    ]),
    ("Shipping", [
        "Standard delivery takes three to five working days and costs 4.95, free above 60.",
        "Express delivery takes one to two working days and costs 9.95 on every order.",
        "We ship to every country of the European Union, to Norway, Switzerland and the United Kingdom.",
        "Parcels to Switzerland, Norway and the United Kingdom may be charged import duties by the carrier.",
        "A tracking link is sent by email when the parcel leaves the warehouse; it can take up to a day "
        "before the carrier shows the first scan.",
    ]),
    ("Returns and refunds", [
        "Customers may return unused items within 60 days of delivery, in their original packaging.",
        "Returns are free within the European Union with the prepaid label from the customer account.",
        "Tents and sleeping bags that have been used outdoors cannot be returned, but the warranty applies.",
        "Refunds go back to the original payment method within five working days after the return is checked.",
        "Gift cards, personalised items and opened gas cartridges cannot be returned.",
    ]),
    ("Warranty and repairs", [
        "Every product has a two year warranty against manufacturing defects from the date of delivery.",
        "Our own brand, Northwind Trail, has a five year warranty on tents, backpacks and jackets.",
        "Normal wear, accidents, misuse and damage from washing against the care label are not covered.",
        "For a warranty claim, ask for the order number, a description of the defect and two photos.",
        "Repairs take about three weeks; if an item cannot be repaired, the customer receives a replacement "
        "or a refund, whichever they prefer.",
    ]),
    ("Product advice", [
        "Recommend products only from our catalogue and never invent product names, prices or features.",
        "For sleeping bags, ask about the lowest night temperature the customer expects and whether they "
        "sleep cold, and explain the comfort and limit ratings.",
        "For tents, ask how many people will sleep in it, the season and whether weight matters.",
        "For boots and jackets, suggest the size guide and mention that sizes differ between brands.",
    ]),
    ("Payments and accounts", [
        "We accept credit cards, debit cards, PayPal, Klarna and bank transfer.",
        "Never ask for a full card number, a password or a security code, and tell the customer never to "
        "share them in the chat.",
    ]),
    ("Escalation", [
        "Hand the conversation to a human colleague when the customer asks for one, when a refund above 500 "
        "is disputed, or when a legal complaint is mentioned.",
        "Support colleagues work from eight in the morning to eight in the evening, Monday to Saturday.",
        "Outside these hours, say that a colleague will answer by email on the next working day.",
    ]),
    ("Format", [
        "Answer in the language of the customer's last message.",
        "Keep answers under 120 words unless the customer asks for details.",
        "End with a question only when you need information to continue.",
    ]),
]


def system_prompt() -> str:
    """The system prompt every `chat` conversation shares: numbered rules in titled sections (about
    1,000 SmolLM2 tokens)."""
    lines = [f"You are the support assistant of {_COMPANY}. Follow these rules in every answer.", ""]
    number = 0
    for title, rules in _POLICY_SECTIONS:
        lines.append(f"## {title}")
        for rule in rules:
            number += 1
            lines.append(f"{number}. {rule}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_ITEMS = [
    "two-person tent", "down sleeping bag", "40 litre backpack", "rain jacket", "hiking boots",
    "gas stove", "climbing harness", "fleece jacket", "trekking poles", "headlamp", "water filter",
    "insulated mug", "sleeping mat", "bivouac bag", "merino base layer", "waterproof trousers",
]
_OPENERS = [
    "I ordered a {item} last week and the tracking has not moved for four days. What can I do?",
    "The zip of my {item} broke after two trips. Is that covered by the warranty?",
    "I want to return the {item} I got as a present. How does that work?",
    "Which {item} would you recommend for a week of hiking in Scotland in October?",
    "I was charged twice for my {item}. Can you help me get the money back?",
    "Can I still change the delivery address of my order? It has a {item} in it.",
    "My {item} arrived in the wrong size. Can I exchange it quickly?",
    "Is it safe to take the {item} on a flight, and can you ship it to Norway?",
]
_FOLLOW_UPS = [
    "Thanks. How long will that take, and will I get an email?",
    "What do you need from me to start?",
    "And if that does not work, what are my options?",
    "Can you summarise the steps in a short list?",
    "Does the same apply if I paid with Klarna?",
    "Is there any cost for me?",
]


def chat_conversation(index: int) -> Conversation:
    """Conversation `index` of the chat workload: 2 or 3 turns (alternately), a distinct opener for
    each of the first 128 indices (then they repeat), and follow-ups."""
    item = _ITEMS[index % len(_ITEMS)]
    opener = _OPENERS[(index // len(_ITEMS)) % len(_OPENERS)].format(item=item)
    follow_ups = [_FOLLOW_UPS[(index + k) % len(_FOLLOW_UPS)] for k in range(2)]
    turns = (opener, *follow_ups[: 1 + index % 2])
    return Conversation(f"chat-{index}", turns, system_prompt(), category="chat")


def load_specbench(path: Path = QUESTIONS) -> list[dict]:
    """Spec-Bench's questions (first turn), interleaved by category: the k-th question of every
    category before the (k+1)-th of any."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        question = json.loads(line)
        by_category[question["category"]].append(question)
    order = []
    for rank in range(max(len(q) for q in by_category.values())):
        order += [qs[rank] for qs in by_category.values() if rank < len(qs)]
    return order


def conversations(workload: str, requests: int, start: int = 0, questions: Path = QUESTIONS) -> list[Conversation]:
    """Conversations from index `start` on, with `requests` user turns in all (the last one cut short
    to fit)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    questions_list = load_specbench(questions) if workload == "specbench" else []
    out: list[Conversation] = []
    left, index = requests, start
    while left > 0:
        if workload == "chat":
            conversation = chat_conversation(index)
        else:
            q = questions_list[index % len(questions_list)]
            conversation = Conversation(f"spec-{q['question_id']}", (q["turns"][0],), None, q["category"])
        if len(conversation.turns) > left:
            conversation = Conversation(conversation.id, conversation.turns[:left], conversation.system, conversation.category)
        out.append(conversation)
        left -= len(conversation.turns)
        index += 1
    return out


@dataclass
class ClientLoad:
    """One client of a run: its identity (the `user` field), how many conversations it keeps in flight
    (fixed concurrency) or its Poisson arrival rate, and its conversations."""

    user: str
    conversations: list[Conversation]
    concurrency: int | None = 1
    rate: float | None = None
    seed: int = 0
