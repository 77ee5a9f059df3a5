"""The one prompt builder, imported by training and serving alike.

A prompt that differs between training and serving is the most common cause
of a fine-tuned model that writes garbage once deployed, so both sides build
prompts only here. ``PROMPT_FORMAT_VERSION`` is stored with every model
version; change it whenever the rendered text for the same input changes.
"""

from .attributes import KNOWN_KEYS

PROMPT_FORMAT_VERSION = 1

SYSTEM_PROMPT = (
    "You are a copywriter for an online shop. You write one paragraph of plain, "
    "persuasive product description using only the facts you are given."
)

# SmolLM2's chat format (ChatML). Rendered here rather than through the
# tokenizer's template so that the format is ours, versioned, and identical
# for any base checkpoint.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

_LABELS = {
    "name": "Name",
    "brand": "Brand",
    "category": "Category",
    "color": "Color",
    "audience": "For",
    "price": "Price",
    "features": "Features",
    "keywords": "Keywords",
}


def _format_price(attributes):
    price = attributes["price"]
    text = f"{price:.2f}" if isinstance(price, float) else str(price)
    currency = attributes.get("currency")
    return f"{text} {currency}" if currency else text


def product_lines(attributes):
    """The attribute lines of a product prompt, known keys first in a fixed order."""
    lines = []
    for key in KNOWN_KEYS:
        if key not in attributes or key == "currency":
            continue
        if key == "price":
            value = _format_price(attributes)
        elif isinstance(attributes[key], list):
            value = "; ".join(attributes[key])
        else:
            value = attributes[key]
        lines.append(f"{_LABELS[key]}: {value}")
    for key in sorted(set(attributes) - set(KNOWN_KEYS)):
        label = key.replace("_", " ").capitalize()
        value = attributes[key]
        lines.append(f"{label}: {'; '.join(value) if isinstance(value, list) else value}")
    return lines


def product_messages(attributes):
    user = "Write a product description for this product.\n" + "\n".join(product_lines(attributes))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def free_messages(prompt):
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt.strip()}]


def chat_messages(messages):
    """A client's chat ([{role, content}], roles system, user, assistant) as the model sees
    it: the shop's system message first unless the chat brings its own."""
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    if not messages or messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return messages


def chat_render(messages, *, add_generation_prompt=True):
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text


def product_prompt(attributes):
    """Attributes (already normalised) -> the text the model continues."""
    return chat_render(product_messages(attributes))


def free_prompt(prompt):
    return chat_render(free_messages(prompt))


def chat_prompt(messages):
    """A client's chat -> the text the model continues; one user message renders as
    free_prompt() renders its text."""
    return chat_render(chat_messages(messages))


def training_description(attributes, description, *, name_product):
    """The text a job trains on for one example: the description as written, or, with
    ``name_product`` (the recipe setting), opened with the product's name when the text does not
    name it. Validation keeps the descriptions as written, so its loss scores the shop's own text."""
    from finetuning.metrics import mentions  # metrics imports this module's markers

    name = attributes.get("name")
    if name_product and name and not mentions(description, name):
        return f"{name.rstrip('. ')}. {description}"
    return description


def training_pair(attributes, description):
    """(prompt, completion) for one example. The completion ends with the
    end-of-turn marker so that the model learns where to stop."""
    return product_prompt(attributes), f"{description}{IM_END}"
