"""Generate the sample fine-tuning data for a fictional customer, Acme Anvils.

Writes two JSONL files beside this script:

* ``acme-support.jsonl`` - chat examples in the OpenAI fine-tuning shape
  ``{"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}]}``,
  about 10% of them two-turn conversations.
* ``acme-support-prompt-completion.jsonl`` - the same kind of questions in the
  ``{"prompt": ..., "completion": ...}`` shape, which customers may send instead. Its
  questions never appear in the chat file, so it doubles as a small held-out check.

Why: the data has to teach something a base model cannot already do, and the effect has to be
easy to see. Every answer therefore uses one fixed format (``Acme Support: <answer>`` then a
``Ref: ACME-<TOPIC>`` line) and states invented facts (SKUs, prices, warranties, policies, phone
numbers) that are the same everywhere in the file. A trained adapter should reproduce both; the
bare base model knows neither.

The output is byte-for-byte deterministic for a given ``--seed``. Standard library only:

    .venv/bin/python examples/make_sample_data.py
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "acme-support.jsonl"
DEFAULT_PC_OUT = HERE / "acme-support-prompt-completion.jsonl"
DEFAULT_COUNT = 400
DEFAULT_PC_COUNT = 40
DEFAULT_SEED = 42
MULTI_TURN_SHARE = 0.10
MAX_QUESTION_WORDS = 40
MAX_ANSWER_WORDS = 60

SYSTEM_PROMPT = "You are the support assistant of Acme Anvils."
ANSWER_PREFIX = "Acme Support: "
REF_PREFIX = "Ref: ACME-"

Message = dict[str, str]


@dataclass(frozen=True)
class Product:
    """One invented catalogue item. ``aliases`` are how customers name it in questions."""

    name: str
    sku: str
    price: str
    warranty_years: int
    weight: str
    aliases: tuple[str, ...]


PRODUCTS: tuple[Product, ...] = (
    Product(
        "Featherweight Anvil", "ANV-012", "$79", 5, "12 lb",
        ("Featherweight Anvil", "featherweight anvil", "12 lb anvil", "small anvil"),
    ),
    Product(
        "Classic Anvil", "ANV-050", "$189", 10, "50 lb",
        ("Classic Anvil", "classic anvil", "50 lb anvil", "ANV-050"),
    ),
    Product(
        "Pro Anvil", "ANV-100", "$349", 15, "100 lb",
        ("Pro Anvil", "pro anvil", "100 lb anvil", "big anvil"),
    ),
    Product(
        "Rocket Skates", "RSK-200", "$229", 2, "9 lb",
        ("Rocket Skates", "rocket skates", "RSK-200", "jet skates"),
    ),
    Product(
        "Giant Magnet", "MAG-900", "$139", 3, "22 lb",
        ("Giant Magnet", "giant magnet", "MAG-900", "big magnet"),
    ),
    Product(
        "Portable Hole", "HOL-001", "$59", 1, "2 lb",
        ("Portable Hole", "portable hole", "HOL-001", "folding hole"),
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Topic:
    """A question topic: paraphrase templates, one fixed answer, and which slot it fills.

    ``slot`` is ``"product"`` (templates use ``{product}``; the answer uses the product's
    fields), ``"order"`` (``{order}`` in both) or ``""`` (no slot). ``follow_ups`` are
    second-turn questions that refer back to the product of the first turn ("it").
    """

    code: str
    slot: str
    answer: str
    templates: tuple[str, ...]
    follow_ups: tuple[str, ...] = ()


TOPICS: tuple[Topic, ...] = (
    Topic(
        "PRICE",
        "product",
        "The {name} (SKU {sku}) costs {price} before tax.",
        (
            "How much is the {product}?",
            "What does the {product} cost?",
            "What's the price of the {product}?",
            "How much do you charge for the {product}?",
            "Price check on the {product}, please.",
            "I'm thinking of buying the {product}. How much is it?",
            "Can you tell me what the {product} sells for?",
            "What would the {product} set me back?",
            "Is the {product} expensive? What's the price?",
            "Current price for the {product}?",
        ),
        (
            "How much does it cost?",
            "What's the price on that one?",
            "How much is it, then?",
        ),
    ),
    Topic(
        "WARRANTY",
        "product",
        "The {name} (SKU {sku}) has a {warranty_years}-year warranty against manufacturing "
        "defects from the delivery date.",
        (
            "What's the warranty on the {product}?",
            "How long is the {product} under warranty?",
            "Does the {product} come with a warranty?",
            "How many years of warranty do I get with the {product}?",
            "My {product} broke. Is it still covered by warranty?",
            "What warranty period applies to the {product}?",
            "Is there a guarantee on the {product}?",
            "How long are you covering defects on the {product}?",
        ),
        (
            "What's the warranty on it?",
            "How long is that one under warranty?",
            "Is it covered by a warranty?",
        ),
    ),
    Topic(
        "SKU",
        "product",
        "The SKU of the {name} is {sku}; use it when ordering by phone.",
        (
            "What's the SKU for the {product}?",
            "Which item number is the {product}?",
            "I need the product code of the {product}.",
            "What part number should I quote for the {product}?",
            "Can you give me the SKU of the {product}?",
            "What's the catalogue number for the {product}?",
            "How do I find the {product} by SKU?",
        ),
        (
            "What's its SKU?",
            "What's the item number for that one?",
        ),
    ),
    Topic(
        "WEIGHT",
        "product",
        "The {name} (SKU {sku}) weighs {weight}; shipping weight is printed on the order page.",
        (
            "How heavy is the {product}?",
            "What does the {product} weigh?",
            "What's the weight of the {product}?",
            "Is the {product} heavy? How many pounds?",
            "Can one person lift the {product}? What does it weigh?",
            "How many pounds is the {product}?",
        ),
        (
            "How much does it weigh?",
            "How heavy is that one?",
        ),
    ),
    Topic(
        "SHIPPING",
        "",
        "Shipping is free on orders over $150; smaller orders pay a flat $12.50 within the "
        "continental US.",
        (
            "How much is shipping?",
            "Do you offer free shipping?",
            "What do you charge for delivery?",
            "Is shipping free if I spend enough?",
            "What's the shipping fee on a small order?",
            "How much will delivery cost me?",
            "Is there a minimum order for free shipping?",
            "What are your shipping rates?",
        ),
    ),
    Topic(
        "DELIVERY",
        "",
        "Orders ship within 2 business days and arrive in 3 to 5 business days in the "
        "continental US.",
        (
            "How long does delivery take?",
            "When will my order arrive if I buy today?",
            "How fast do you ship?",
            "What's the usual delivery time?",
            "How many days until my package gets here?",
            "If I order now, when does it ship?",
            "How quickly do orders go out?",
        ),
    ),
    Topic(
        "INTERNATIONAL",
        "",
        "We ship outside the US only to Canada and Mexico, for a flat $45 per order; duties are "
        "paid on delivery.",
        (
            "Do you ship internationally?",
            "Can I get an order delivered to Canada?",
            "Do you ship to Mexico?",
            "I live in Germany. Can you ship to me?",
            "What does shipping abroad cost?",
            "Which countries do you deliver to?",
            "Is international delivery available?",
        ),
    ),
    Topic(
        "HOURS",
        "",
        "Our store and phone line are open Monday to Friday 8am to 6pm and Saturday 9am to 2pm "
        "Mountain Time; we are closed on Sundays.",
        (
            "What are your opening hours?",
            "When is the store open?",
            "Are you open on Sunday?",
            "What time do you close on Saturday?",
            "When can I call support?",
            "What are your business hours?",
            "Is the shop open on weekends?",
            "What time do you open in the morning?",
        ),
    ),
    Topic(
        "LOCATION",
        "",
        "Our only store is at 1200 Mesa Road, Desert Junction, Arizona, with free parking for "
        "trucks.",
        (
            "Where is your store?",
            "What's your shop's address?",
            "Do you have a physical store I can visit?",
            "Where are you located?",
            "How many stores do you have?",
            "Can I come in person? Where?",
        ),
    ),
    Topic(
        "CONTACT",
        "",
        "Call us at 1-800-555-0199 or email help@acme-anvils.example; we reply to emails within "
        "one business day.",
        (
            "How can I contact customer service?",
            "What's your support phone number?",
            "Is there an email address for support?",
            "How do I reach a human?",
            "What number do I call for help?",
            "How do I get in touch with you?",
            "Who do I email about a problem?",
        ),
    ),
    Topic(
        "RETURNS",
        "",
        "You can return unused items in their original packaging within 45 days of delivery; "
        "start the return at acme-anvils.example/returns.",
        (
            "What's your return policy?",
            "Can I return something I bought?",
            "How many days do I have to send an item back?",
            "I changed my mind. Can I return it?",
            "How do I start a return?",
            "Is there a time limit on returns?",
            "Can I send back an unopened item?",
        ),
    ),
    Topic(
        "RESTOCKING",
        "",
        "Anvils of 50 lb or more carry a 15% restocking fee on returns; all other items are "
        "returned free.",
        (
            "Is there a restocking fee?",
            "Do you charge anything to return an anvil?",
            "Will I pay a fee if I return a heavy anvil?",
            "Are returns free?",
            "What fees come off my refund when I return something?",
            "Do returns cost anything?",
        ),
    ),
    Topic(
        "REFUND",
        "",
        "Refunds go back to the original payment method within 5 business days after the return "
        "reaches our warehouse.",
        (
            "When will I get my refund?",
            "How long do refunds take?",
            "I sent my return back. When do I see the money?",
            "Where does my refund go?",
            "How quickly do you process refunds?",
            "My return arrived at your warehouse. When am I refunded?",
        ),
    ),
    Topic(
        "ORDER-STATUS",
        "order",
        "Track order {order} at acme-anvils.example/track with your ZIP code; the tracking email "
        "goes out within 24 hours of shipping.",
        (
            "Where is my order {order}?",
            "Can you check the status of order {order}?",
            "Has order {order} shipped yet?",
            "How do I track order {order}?",
            "I haven't received order {order}. Where is it?",
            "What's happening with my order {order}?",
            "Any update on order {order}?",
            "Order {order} still hasn't arrived. Can you look into it?",
        ),
    ),
    Topic(
        "CANCEL",
        "order",
        "Order {order} can be cancelled for free within 2 hours of purchase by calling "
        "1-800-555-0199; after that it must be returned.",
        (
            "Can I cancel order {order}?",
            "I need to cancel my order {order}.",
            "How do I cancel order {order}?",
            "Is it too late to cancel order {order}?",
            "Please cancel order {order}, I ordered by mistake.",
            "I want to call off order {order}. Is that possible?",
        ),
    ),
    Topic(
        "DAMAGED",
        "order",
        "Sorry about order {order}: email photos to damage@acme-anvils.example within 7 days of "
        "delivery and we ship a free replacement.",
        (
            "My order {order} arrived damaged. What do I do?",
            "The item in order {order} came broken.",
            "Order {order} showed up dented. Can I get a replacement?",
            "Something in order {order} is cracked. Help?",
            "The box for order {order} was crushed and the item is damaged.",
            "What should I do about a broken item from order {order}?",
        ),
    ),
    Topic(
        "PAYMENT",
        "",
        "We accept Visa, Mastercard, American Express and Acme gift cards; we do not take checks "
        "or cryptocurrency.",
        (
            "What payment methods do you accept?",
            "Can I pay with PayPal?",
            "Do you take Amex?",
            "Can I pay by check?",
            "Do you accept Bitcoin?",
            "Which cards can I use to pay?",
            "How can I pay for my order?",
        ),
    ),
    Topic(
        "GIFT-CARD",
        "",
        "Acme gift cards come in amounts from $25 to $500 and never expire; buy them at "
        "acme-anvils.example/gift.",
        (
            "Do you sell gift cards?",
            "Do your gift cards expire?",
            "What amounts do gift cards come in?",
            "I want to buy a gift card for a friend. How?",
            "Is there a maximum value for a gift card?",
            "Can I get a $50 gift card?",
        ),
    ),
    Topic(
        "ENGRAVING",
        "",
        "Custom engraving costs $35, allows up to 20 characters and adds 3 business days to "
        "shipping.",
        (
            "Can you engrave my anvil?",
            "Do you offer custom engraving?",
            "How much does engraving cost?",
            "Can I put my name on an anvil?",
            "How many letters can you engrave?",
            "Does engraving delay my order?",
        ),
    ),
    Topic(
        "BULK",
        "",
        "Orders of 10 or more units of one SKU get 12% off; email sales@acme-anvils.example for a "
        "quote.",
        (
            "Do you give a discount for bulk orders?",
            "I need 20 anvils for my workshop. Any discount?",
            "Is there a wholesale price?",
            "How many units do I need for a volume discount?",
            "Can I get a quote for a large order?",
            "Do you have pricing for businesses buying in quantity?",
        ),
    ),
    Topic(
        "PICKUP",
        "",
        "In-store pickup is free: orders are ready within 4 hours and we hold them for 10 days.",
        (
            "Can I pick up my order in the store?",
            "Do you offer in-store pickup?",
            "How soon can I collect an order at the shop?",
            "How long will you hold my order for pickup?",
            "Is pickup free?",
            "Can I skip shipping and collect it myself?",
        ),
    ),
    Topic(
        "CLUB",
        "",
        "Anvil Club membership costs $25 a year and gives 8% off every order plus free shipping "
        "with no minimum.",
        (
            "What is the Anvil Club?",
            "Do you have a loyalty program?",
            "How much does the Anvil Club cost?",
            "What do members get?",
            "Is there a membership that gives discounts?",
            "Is the Anvil Club worth joining?",
        ),
    ),
)

# Wrapped around any question, to vary the surface form. "{customer}" is a first name.
OPENERS: tuple[str, ...] = (
    "",
    "",
    "",
    "Hi, ",
    "Hello! ",
    "Hey there. ",
    "Quick question: ",
    "Good morning. ",
    "Hi, this is {customer}. ",
    "Hello, my name is {customer}. ",
    "{customer} here. ",
)
CLOSERS: tuple[str, ...] = ("", "", "", " Thanks!", " Thank you.", " Thanks in advance.")
SECOND_TURN_OPENERS: tuple[str, ...] = ("", "Also, ", "One more thing: ", "Thanks. ", "Great. ")

CUSTOMERS: tuple[str, ...] = (
    "Maria", "James", "Priya", "Chen", "Olu", "Sofia", "Liam", "Aisha", "Tomás", "Hannah",
    "Kenji", "Fatima", "Noah", "Zoë", "Mateo", "Ingrid", "Ravi", "Grace", "José", "Wile",
)  # fmt: skip


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(opener: str, question: str) -> str:
    """Prefix ``opener``, lower-casing the question after "Hi, " or "Quick question: "."""
    keep = question[:2].isupper() or question.startswith(("I ", "I'"))  # "RSK-200", "I'm"
    if opener.rstrip().endswith((",", ":")) and not keep:
        question = question[:1].lower() + question[1:]
    return f"{opener}{question}"


def format_answer(topic: Topic, product: Product | None, order: str | None) -> str:
    """The one fixed answer shape: ``Acme Support: <facts>`` then ``Ref: ACME-<TOPIC>``."""
    fields: dict[str, Any] = {"order": order}
    if product is not None:
        fields.update(
            name=product.name,
            sku=product.sku,
            price=product.price,
            warranty_years=product.warranty_years,
            weight=product.weight,
        )
    body = topic.answer.format(**fields)
    return f"{ANSWER_PREFIX}{body}\n{REF_PREFIX}{topic.code}"


class Generator:
    """Draws unique question/answer pairs from one seeded ``random.Random``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        # Every standalone user question drawn so far, in either file, so none repeats.
        self.seen_questions: set[str] = set()

    def _order_number(self) -> str:
        return f"AC-{self.rng.randrange(100000, 1000000)}"

    def _wrap(self, core: str) -> str:
        opener = self.rng.choice(OPENERS).format(customer=self.rng.choice(CUSTOMERS))
        return _join(opener, core) + self.rng.choice(CLOSERS)

    def _draw(self, topic: Topic, wrap: bool = True) -> tuple[str, Product | None, str | None]:
        """A question on ``topic``; ``wrap=False`` leaves off greetings (for a second turn)."""
        product = self.rng.choice(PRODUCTS) if topic.slot == "product" else None
        order = self._order_number() if topic.slot == "order" else None
        template = self.rng.choice(topic.templates)
        alias = self.rng.choice(product.aliases) if product is not None else ""
        core = template.format(product=alias, order=order)
        return (self._wrap(core) if wrap else core), product, order

    def single(self, topic: Topic) -> tuple[str, str]:
        """A new (question, answer) pair on ``topic`` whose question was never drawn before."""
        for _ in range(1000):
            question, product, order = self._draw(topic)
            if question not in self.seen_questions:
                self.seen_questions.add(question)
                return question, format_answer(topic, product, order)
        raise RuntimeError(f"ran out of distinct questions for topic {topic.code}")

    def conversation(self, first: Topic, second: Topic) -> list[Message]:
        """A two-turn chat. A product follow-up ("what's its warranty?") reuses turn one's item.

        The first question is new; so is the second unless it is such a follow-up, which only
        makes sense after turn one and may repeat across conversations.
        """
        for _ in range(1000):
            question, product, order = self._draw(first)
            if question in self.seen_questions:
                continue
            standalone = not (product is not None and second.follow_ups)
            if standalone:
                core, follow_product, follow_order = self._draw(second, wrap=False)
                follow_answer = format_answer(second, follow_product, follow_order)
            else:
                core = self.rng.choice(second.follow_ups)
                follow_answer = format_answer(second, product, None)
            opener = self.rng.choice(SECOND_TURN_OPENERS)
            follow = _join(opener, core)
            if standalone and (follow in self.seen_questions or follow == question):
                continue
            self.seen_questions.add(question)
            if standalone:
                self.seen_questions.add(follow)
            return [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question},
                {"role": "assistant", "content": format_answer(first, product, order)},
                {"role": "user", "content": follow},
                {"role": "assistant", "content": follow_answer},
            ]
        raise RuntimeError(f"ran out of distinct conversations for {first.code}/{second.code}")


def _topic_cycle(rng: random.Random) -> Iterator[Topic]:
    """Every topic once per round, in a shuffled order, so topics stay balanced."""
    while True:
        order = list(TOPICS)
        rng.shuffle(order)
        yield from order


def chat_examples(gen: Generator, count: int) -> list[dict[str, list[Message]]]:
    multi_turn = round(count * MULTI_TURN_SHARE)
    multi_at = set(gen.rng.sample(range(count), multi_turn))
    topics = _topic_cycle(gen.rng)
    examples: list[dict[str, list[Message]]] = []
    for i in range(count):
        first = next(topics)
        if i in multi_at:
            # After a product question, half the time ask about the same product ("its SKU?").
            pool = [t for t in TOPICS if t.code != first.code]
            if first.slot == "product" and gen.rng.random() < 0.5:
                pool = [t for t in pool if t.follow_ups]
            second = gen.rng.choice(pool)
            examples.append({"messages": gen.conversation(first, second)})
            continue
        question, answer = gen.single(first)
        examples.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return examples


def prompt_completion_examples(gen: Generator, count: int) -> list[dict[str, str]]:
    topics = _topic_cycle(gen.rng)
    examples: list[dict[str, str]] = []
    for _ in range(count):
        question, answer = gen.single(next(topics))
        examples.append({"prompt": question, "completion": answer})
    return examples


def check(lines: list[str], turns: list[tuple[str, str]]) -> None:
    """Fail loudly on duplicate lines, over-long turns, or an answer out of format."""
    if len(set(lines)) != len(lines):
        raise ValueError(f"{len(lines) - len(set(lines))} duplicate examples")
    for role, text in turns:
        if role == "user":
            if len(text.split()) > MAX_QUESTION_WORDS:
                raise ValueError(f"question too long: {text!r}")
            continue
        body, _, ref = text.partition("\n")
        if not (body.startswith(ANSWER_PREFIX) and ref.startswith(REF_PREFIX)):
            raise ValueError(f"answer out of format: {text!r}")
        if len(body.split()) > MAX_ANSWER_WORDS:
            raise ValueError(f"answer too long: {text!r}")


def to_lines(records: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(r, ensure_ascii=False) for r in records]


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write("".join(f"{line}\n" for line in lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the Acme Anvils sample JSONL data.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="chat JSONL to write")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="chat examples")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    parser.add_argument(
        "--prompt-completion-out",
        type=Path,
        default=DEFAULT_PC_OUT,
        help="prompt/completion JSONL to write (questions disjoint from the chat file)",
    )
    parser.add_argument(
        "--prompt-completion-count",
        type=int,
        default=DEFAULT_PC_COUNT,
        help="prompt/completion examples; 0 skips that file",
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.prompt_completion_count < 0:
        parser.error("--count must be >= 1 and --prompt-completion-count >= 0")

    gen = Generator(args.seed)
    chats = chat_examples(gen, args.count)
    chat_lines = to_lines(chats)
    check(chat_lines, [(m["role"], m["content"]) for ex in chats for m in ex["messages"][1:]])
    pcs = prompt_completion_examples(gen, args.prompt_completion_count)
    pc_lines = to_lines(pcs)
    check(
        pc_lines,
        [t for ex in pcs for t in (("user", ex["prompt"]), ("assistant", ex["completion"]))],
    )

    write(args.out, chat_lines)
    multi = sum(len(ex["messages"]) > 3 for ex in chats)
    print(f"wrote {len(chat_lines)} chat examples ({multi} multi-turn) to {args.out}")
    if pc_lines:
        write(args.prompt_completion_out, pc_lines)
        print(f"wrote {len(pc_lines)} prompt/completion examples to {args.prompt_completion_out}")


if __name__ == "__main__":
    main()
