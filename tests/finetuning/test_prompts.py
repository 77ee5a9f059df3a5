from finetuning import prompts
from finetuning.attributes import attributes_normalize


def test_product_prompt_lists_known_attributes_in_a_fixed_order_then_extras():
    attributes = attributes_normalize(
        {
            "material": "oak",
            "price": "$1,299.5",
            "color": "Walnut",
            "name": "Harbour Table",
            "features": "extends to 8 seats; oiled finish",
            "brand": "Pebble & Pine",
            "currency": "USD",
        }
    )
    text = prompts.product_prompt(attributes)
    user = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert user.splitlines() == [
        "Write a product description for this product.",
        "Name: Harbour Table",
        "Brand: Pebble & Pine",
        "Color: Walnut",
        "Price: 1299.50 USD",
        "Features: extends to 8 seats; oiled finish",
        "Material: oak",
    ]


def test_prompt_is_chatml_ending_with_the_assistant_turn():
    text = prompts.product_prompt({"name": "Mug"})
    assert text.startswith("<|im_start|>system\n" + prompts.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_training_pair_uses_the_serving_prompt_and_ends_the_turn():
    attributes = {"name": "Mug", "color": "Blue"}
    prompt, completion = prompts.training_pair(attributes, "A blue mug.")
    assert prompt == prompts.product_prompt(attributes)
    assert completion == "A blue mug.<|im_end|>"


def test_the_same_product_gives_the_same_prompt_however_it_was_written():
    a = attributes_normalize({"Name": "  Mug ", "price": 5, "features": ["big", " blue "]})
    b = attributes_normalize({"name": "Mug", "price": "5.00", "features": "big; blue"})
    assert prompts.product_prompt(a) == prompts.product_prompt(b)


def test_free_prompt_keeps_the_system_prompt():
    text = prompts.free_prompt("  Describe a scarf. ")
    assert "<|im_start|>user\nDescribe a scarf.<|im_end|>" in text
    assert prompts.SYSTEM_PROMPT in text


def test_prompt_format_has_a_version():
    assert isinstance(prompts.PROMPT_FORMAT_VERSION, int) and prompts.PROMPT_FORMAT_VERSION >= 1
