"""The serving engine against plain transformers, on a tiny model.

The shared tiny checkpoint answers every prompt with newlines; here its
weights are drawn wider (initializer_range 0.3), so that greedy text changes
with every token of context and any slip in the cache, positions, masks or
adapters shows in the text. The prompts and the adapters' seeds are chosen
so that at no step of a reference answer are the top two logits within 1e-3
of each other: the engine's rounding differs from transformers' by about
1e-5, far too little to change a token.
"""

import copy
import json
from dataclasses import replace

import pytest
import torch

from finetuning import prompts
from inference.engine import Adapter, DecoderWeights, Engine, QueueFull
from inference.engine.params import GenerationParams
from tests.inference.waiting import eventually, slow_steps

N = 48  # new tokens per reference answer
PROMPTS = [
    prompts.product_prompt({"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}),
    prompts.free_prompt("Describe a scarf."),
    "hello",
    prompts.product_prompt({"name": "Toy 3", "category": "Toys"}),  # the model ends this answer itself
]
ADAPTERS = {  # name: (seed of its random weights, LoRA options)
    # Every projection of both fused groups.
    "lora": (
        1,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
    ),
    # Part of a fused group (q and v, not k), rank-stabilised scaling.
    "rslora": (
        6,
        {"r": 2, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    ),
}
GREEDY = GenerationParams()
SAMPLED = GenerationParams(temperature=0.9, top_k=40, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def lively(tiny_checkpoint, tmp_path_factory):
    """The tiny model with wide weights, two LoRA adapters on it (as PEFT serves them, and as the
    engine reads them from PEFT's files), and its decoder weights in fp32 and int8."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    config = LlamaConfig.from_pretrained(tiny_checkpoint, initializer_range=0.3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    decoder = DecoderWeights(model)
    peft, adapters = {}, {}
    for name, (seed, options) in ADAPTERS.items():
        directory = tmp_path_factory.mktemp(f"adapter-{name}")
        torch.manual_seed(seed)
        # init_lora_weights=False: random A and B, so the adapter changes the answer from the start.
        get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **options)).save_pretrained(directory)
        peft[name] = PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
        config = json.loads((directory / "adapter_config.json").read_text())
        adapters[name] = Adapter(name, load_file(directory / "adapter_model.safetensors"), config, decoder)
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    return _Lively(
        model=model,
        tokenizer=tokenizer,
        stop_ids=stop_ids,
        decoder=decoder,
        decoder_int8=DecoderWeights(model, quantize="int8"),
        peft=peft,
        adapters=adapters,
    )


class _Lively:
    def __init__(self, **fields):
        self.__dict__.update(fields)

    def ids(self, prompt):
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def text(self, ids):
        """The text of generated ids, as an answer shows it: up to the first stop id, stripped."""
        cut = next((i for i, token in enumerate(ids) if token in self.stop_ids), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def expected(lively, hf_generate):
    """Plain transformers' greedy answer: (token ids through the first stop id, text)."""
    answers = {}

    def get(prompt, adapter=None, *, repetition_penalty=1.0, max_new_tokens=N):
        key = (prompt, adapter, repetition_penalty)
        if key not in answers:
            model = lively.model if adapter is None else lively.peft[adapter]
            answers[key] = hf_generate(
                model,
                lively.tokenizer,
                lively.ids(prompt),
                stop_ids=lively.stop_ids,
                max_new_tokens=N,
                repetition_penalty=repetition_penalty,
            )
        ids = answers[key][0][:max_new_tokens]  # greedy: a shorter answer is the start of the longer one
        return ids, lively.text(ids)

    return get


@pytest.fixture
def make_engine(lively):
    engines = []

    def make(*, max_batch=8, max_queue=32, quantize="none", native=True, **options):
        decoder = lively.decoder if quantize == "none" else lively.decoder_int8
        if not native:  # as on a machine without a C++ compiler
            decoder = copy.copy(decoder)
            decoder.kernels = None
        engine = Engine(
            decoder,
            lively.tokenizer,
            stop_token_ids=options.pop("stop_token_ids", lively.stop_ids),
            max_batch=max_batch,
            max_queue=max_queue,
            max_tokens=1024,
            name="test",
            **options,
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def _submit(engine, lively, prompt, *, adapter=None, sampling=GREEDY, max_new_tokens=N, timeout=30, **kwargs):
    return engine.submit(
        prompt_ids=lively.ids(prompt),
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        adapter=None if adapter is None else lively.adapters[adapter],
        timeout=timeout,
        **kwargs,
    )


def _submit_together(engine, lively, requests):
    """Every request in the queue before the scheduler admits the first: it waits on the
    engine's lock for work, so it sees them all at once (up to max_batch, the rest as slots free)."""
    with engine._cond:
        return [_submit(engine, lively, prompt, **options) for prompt, options in requests]


def _collect(generation):
    """{index: (Completion, the streamed chunks joined)}."""
    chunks, done = {}, {}
    for kind, index, payload in generation:
        if kind == "chunk":
            chunks[index] = chunks.get(index, "") + payload
        else:
            done[index] = payload
    return {index: (completion, chunks.get(index, "")) for index, completion in done.items()}


def _assert_greedy(generation, expected_ids, expected_text, label):
    [(completion, streamed)] = _collect(generation).values()
    assert generation.sequences[0].tokens == expected_ids, label
    assert completion.text == expected_text and completion.tokens == len(expected_ids), label
    ended = expected_ids[-1] in generation.engine.stop_token_ids
    assert completion.finish_reason == ("stop" if ended else "length"), label
    assert streamed == completion.text, label
    return completion


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
@pytest.mark.parametrize("adapter", [None, "lora", "rslora"])
def test_greedy_answers_equal_transformers_generate(lively, expected, make_engine, adapter, repetition_penalty):
    engine = make_engine()
    answers = [expected(p, adapter, repetition_penalty=repetition_penalty) for p in PROMPTS]
    if adapter is not None:
        assert all(
            a != expected(p, repetition_penalty=repetition_penalty) for p, a in zip(PROMPTS, answers, strict=True)
        )
    if repetition_penalty != 1.0:
        assert all(a != expected(p, adapter) for p, a in zip(PROMPTS, answers, strict=True))
    if adapter is None and repetition_penalty == 1.0:
        assert any(len(ids) < N for ids, _ in answers), "no answer ends with the model's own stop token"
    sampling = GenerationParams(repetition_penalty=repetition_penalty)
    for prompt, (ids, text) in zip(PROMPTS, answers, strict=True):
        generation = _submit(engine, lively, prompt, adapter=adapter, sampling=sampling)
        _assert_greedy(generation, ids, text, prompt[:40])


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_greedy_answers_are_the_same_in_a_shared_batch(lively, expected, make_engine, native):
    """Versions, penalties, prompt and answer lengths mixed in one batch, more requests than
    slots: requests join the running batch as others leave it, each at its own position.
    Batched fp32 steps run on the native kernels, or on torch's products without them."""
    engine = make_engine(max_batch=6, native=native)
    lengths = [N, 9, 30, 4, 41, 17, 23]
    combinations = [(p, a, r) for r in (1.0, 1.3) for a in (None, "lora", "rslora") for p in PROMPTS]
    requests, answers = [], []
    for i, (prompt, adapter, penalty) in enumerate(combinations):
        length = lengths[i % len(lengths)]
        options = {
            "adapter": adapter,
            "sampling": GenerationParams(repetition_penalty=penalty),
            "max_new_tokens": length,
        }
        requests.append((prompt, options))
        answers.append(expected(prompt, adapter, repetition_penalty=penalty, max_new_tokens=length))
    generations = _submit_together(engine, lively, requests)
    spans = []
    for generation, (ids, text), request in zip(generations, answers, requests, strict=True):
        completion = _assert_greedy(generation, ids, text, request)
        spans.append((generation.sequences[0].started_at, completion.finished_at))
    # The batch was full at once, and refilled while it ran.
    first_done = min(end for _, end in spans)
    assert sum(start < first_done for start, _ in spans) == 6
    assert any(start > first_done and any(s < start < e for s, e in spans) for start, _ in spans)


def _tokens(generation):
    """The completions of ``generation`` by index, once done, with the ids each was made of."""
    done = _collect(generation)
    return {index: (completion, generation.sequences[index].tokens) for index, (completion, _) in done.items()}


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(lively, make_engine, quantize):
    engine = make_engine(max_batch=4, quantize=quantize)
    [(alone, alone_ids)] = _tokens(_submit(engine, lively, PROMPTS[0], sampling=SAMPLED)).values()
    [(next_seed, _)] = _tokens(_submit(engine, lively, PROMPTS[0], sampling=replace(SAMPLED, seed=8))).values()
    assert alone.text != next_seed.text
    crowd = [
        (PROMPTS[1], {"sampling": SAMPLED}),
        (PROMPTS[0], {"sampling": SAMPLED, "adapter": "lora"}),
        (PROMPTS[2], {}),
        (PROMPTS[0], {"sampling": SAMPLED}),  # more requests than slots: this one waits for a slot
        (PROMPTS[3], {"sampling": GenerationParams(temperature=1.2, seed=3)}),
        (PROMPTS[0], {"sampling": SAMPLED, "max_new_tokens": 20}),
        (PROMPTS[0], {"sampling": SAMPLED, "n": 2}),
    ]
    batched = [_tokens(g) for g in _submit_together(engine, lively, crowd)]
    assert batched[3][0][0].text == alone.text and batched[3][0][1] == alone_ids
    assert batched[5][0][1] == alone_ids[:20]
    # Sequence i of a request draws with seed + i.
    assert batched[6][0][0].text == alone.text and batched[6][1][0].text == next_seed.text
    assert batched[1][0][0].text != alone.text  # the adapter changes the distribution the draws pick from


def _straddling_stops(lively, ids, text, count):
    """Stop sequences of four characters that each begin in one token and end in the next,
    found in ``text`` only where they begin: [(stop, where it begins)], in text order."""
    found = []
    for k in range(2, len(ids)):
        start = len(lively.tokenizer.decode(ids[:k], skip_special_tokens=True).lstrip()) - 2
        stop = text[start : start + 4]
        if start < 8 or len(stop) < 4 or not stop.isascii() or not stop.isprintable() or stop != stop.strip():
            continue
        if text.find(stop) == start and not any(start < end + 4 for _, end in found):
            found.append((stop, start))
        if len(found) == count:
            return found
    raise AssertionError(f"no {count} stop sequences to cut {text!r} at")


def _tokens_until(lively, ids, stop):
    """How many tokens of ``ids`` make a text that holds ``stop``."""
    return next(k for k in range(1, len(ids) + 1) if stop in lively.tokenizer.decode(ids[:k], skip_special_tokens=True))


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_the_text_ends_before_the_first_stop_sequence(lively, expected, make_engine, adapter):
    ids, text = expected(PROMPTS[0], adapter)
    (early, cut), (late, _) = _straddling_stops(lively, ids, text, 2)
    engine = make_engine()
    # The first in the text wins, whatever its place in the list.
    [(completion, streamed)] = _collect(
        _submit(engine, lively, PROMPTS[0], adapter=adapter, stops=(late, early))
    ).values()
    assert completion.text == text[:cut].rstrip() and early not in completion.text
    assert completion.finish_reason == "stop"
    assert completion.tokens == _tokens_until(lively, ids, early) < len(ids)  # generation stopped right there
    assert streamed == completion.text
    # A stop sequence the text never holds, whose start the answer ends with: held back while it
    # could still come, given back at the end.
    never = text[-2:] + "\x7f"
    assert never not in text
    [(completion, streamed)] = _collect(_submit(engine, lively, PROMPTS[0], adapter=adapter, stops=(never,))).values()
    assert (completion.text, completion.finish_reason, completion.tokens) == (text, "length", N)
    assert streamed == text


def test_text_streams_as_it_is_generated(lively, expected, make_engine):
    _, text = expected(PROMPTS[1])
    engine = make_engine()
    chunks = [payload for kind, _, payload in _submit(engine, lively, PROMPTS[1]) if kind == "chunk"]
    assert len(chunks) > N // 4 and "".join(chunks) == text


def test_max_new_tokens_caps_the_answer(lively, expected, make_engine):
    ids, text = expected(PROMPTS[0], max_new_tokens=5)
    engine = make_engine()
    [(completion, streamed)] = _collect(_submit(engine, lively, PROMPTS[0], max_new_tokens=5)).values()
    assert (completion.text, completion.finish_reason, completion.tokens) == (text, "length", 5)
    assert streamed == text


def test_a_full_queue_refuses_with_a_retry_delay_and_earlier_work_goes_on(lively, expected, make_engine, monkeypatch):
    engine = make_engine(max_batch=1, max_queue=2)
    slow_steps(engine, monkeypatch)
    running = _submit(engine, lively, PROMPTS[0])
    assert eventually(lambda: engine.load() == (1, 0))
    waiting = [_submit(engine, lively, prompt, max_new_tokens=8) for prompt in PROMPTS[1:3]]
    with pytest.raises(QueueFull) as refused:
        _submit(engine, lively, PROMPTS[3], max_new_tokens=8)
    assert isinstance(refused.value.retry_after, int) and refused.value.retry_after >= 1
    assert engine.load() == (1, 2)
    _assert_greedy(running, *expected(PROMPTS[0]), "running")
    for generation, prompt in zip(waiting, PROMPTS[1:3], strict=True):
        _assert_greedy(generation, *expected(prompt, max_new_tokens=8), prompt)
    # The queue drained: taken again.
    _assert_greedy(
        _submit(engine, lively, PROMPTS[3], max_new_tokens=8), *expected(PROMPTS[3], max_new_tokens=8), "after"
    )


def test_a_request_that_would_time_out_waiting_is_refused_at_once(lively, make_engine, monkeypatch):
    """Overload: when the sequences ahead would take longer than a request's time limit, it is
    refused with a retry delay instead of queued to time out (a 504 after a long wait)."""
    engine = make_engine(max_batch=1, max_queue=8)
    slow_steps(engine, monkeypatch)
    running = _submit(engine, lively, PROMPTS[0])
    assert eventually(lambda: engine.load() == (1, 0))
    engine._seconds_per_sequence = 20.0  # as measured on a slow or flooded machine
    waiting = _submit(engine, lively, PROMPTS[1], max_new_tokens=8, timeout=30)  # about 20 s ahead: in
    with pytest.raises(QueueFull) as refused:
        _submit(engine, lively, PROMPTS[2], max_new_tokens=8, timeout=30)  # about 40 s ahead: out
    assert "overloaded" in str(refused.value) and refused.value.retry_after >= 20
    later = _submit(engine, lively, PROMPTS[2], max_new_tokens=8, timeout=60)  # time enough: in
    for generation in (running, waiting, later):
        generation.cancel()
    engine.close(wait=10)


# An int8 engine's step is a round of up to 9 tokens: slower rounds, to act while one runs.
QUANTIZED_PACE = pytest.mark.parametrize("quantize,pace", [("none", 0.02), ("int8", 0.1)])


@QUANTIZED_PACE
def test_past_its_deadline_a_request_ends_with_timeout(lively, expected, make_engine, monkeypatch, quantize, pace):
    engine = make_engine(max_batch=1, quantize=quantize)
    slow_steps(engine, monkeypatch, pace)  # N tokens take about a second
    running = _submit(engine, lively, PROMPTS[0], timeout=0.3)
    # In the slot first: with another one still waiting, a request that cannot start within its
    # time limit would be refused at once (QueueFull, test below), not queued to time out.
    assert eventually(lambda: engine.load() == (1, 0))
    waiting = _submit(engine, lively, PROMPTS[1], timeout=0.1)  # never gets the slot in time
    [(late, _)] = _collect(waiting).values()
    [(cut_short, _)] = _collect(running).values()
    assert (late.finish_reason, late.tokens, late.text) == ("timeout", 0, "")
    assert late.finished_at < cut_short.finished_at  # not kept waiting for the slot
    assert cut_short.finish_reason == "timeout" and 0 < cut_short.tokens < N
    assert cut_short.finished_at - running.submitted_at < 1.0
    ids, _ = expected(PROMPTS[0])
    assert cut_short.text == lively.text(ids[: cut_short.tokens])
    assert engine.load() == (0, 0)


@QUANTIZED_PACE
def test_cancel_frees_the_slot_for_the_next_request(lively, expected, make_engine, monkeypatch, quantize, pace):
    engine = make_engine(max_batch=1, quantize=quantize)
    slow_steps(engine, monkeypatch, pace)
    first = _submit(engine, lively, PROMPTS[0])
    assert eventually(lambda: engine.load() == (1, 0))
    second = _submit(engine, lively, PROMPTS[1])
    third = _submit(engine, lively, PROMPTS[2])
    assert engine.load() == (1, 2)
    third.cancel()  # waiting: it leaves the queue without running
    first.cancel()
    assert eventually(lambda: second.first_token_at is not None, timeout=1.0)  # admitted
    assert engine.load() == (1, 0)
    [(cancelled, _)] = _collect(first).values()
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens < N
    [(never_ran, _)] = _collect(third).values()
    assert (never_ran.finish_reason, never_ran.tokens) == ("cancelled", 0)
    # The slot's cache held the cancelled request: the next one answers as it would alone.
    second_ids, _ = expected(PROMPTS[1])
    assert eventually(lambda: len(second.sequences[0].tokens) >= 4)
    second.cancel()
    assert eventually(lambda: engine.load() == (0, 0), timeout=1.0), engine.load()
    [(stopped, _)] = _collect(second).values()
    assert stopped.finish_reason == "cancelled" and 4 <= stopped.tokens < N
    assert second.sequences[0].tokens == second_ids[: stopped.tokens]


def _int8_logits(engine, ids):
    """The int8 weights' next-token logits after ``ids``, fed one token at a time through an
    int8 draft step into slot 0 while the scheduler waits for work."""
    with torch.inference_mode():
        for position, token in enumerate(ids):
            logits = engine._decode_native(torch.tensor([[token]]), torch.tensor([position]), kernel="int8")
    return logits[0]


def _dequantised(weight):
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(weight / scale).clamp(-127, 127) * scale


def test_int8_drafts_are_the_int8_weights_numbers(lively, make_engine):
    """A draft's logits are those of the model with every projection and the output head
    rounded to int8 (but the best 64 candidates, rescored on the fp32 head), close to fp32's."""
    quantized = make_engine(quantize="int8")
    assert quantized.decoder.layers[0].qkv.weight.dtype == torch.int8
    rounded = copy.deepcopy(lively.model)
    with torch.no_grad():
        for module in rounded.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(_dequantised(module.weight))
        rounded.lm_head.weight = torch.nn.Parameter(_dequantised(rounded.lm_head.weight.detach().clone()))
    for prompt in PROMPTS:
        ids = lively.ids(prompt)
        with torch.inference_mode():
            exact = lively.model(torch.tensor([ids])).logits[0, -1]
            expected = rounded(torch.tensor([ids])).logits[0, -1]
        approximate = _int8_logits(quantized, ids)
        drafted = torch.ones_like(approximate, dtype=torch.bool)
        drafted[approximate.topk(64).indices] = False
        torch.testing.assert_close(approximate[drafted], expected[drafted], atol=1e-4, rtol=1e-4)
        assert not torch.equal(approximate, exact)
        assert torch.nn.functional.cosine_similarity(approximate, exact, dim=0) > 0.995


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
@pytest.mark.parametrize("adapter", [None, "lora", "rslora"])
def test_int8_answers_are_the_fp32_answers(lively, expected, make_engine, adapter, repetition_penalty, monkeypatch):
    """Every token an int8 engine gives out is the fp32 weights' choice: its greedy text is
    transformers' generate's, however far its int8 drafts stray."""
    engine = make_engine(quantize="int8")
    drafted, kept = [], []
    speculate = Engine._speculate

    def counted(self, drafts):
        batch = list(self._active)
        before = sum(len(s.tokens) for s in batch)
        speculate(self, drafts)
        drafted.append(drafts)
        kept.append(sum(len(s.tokens) for s in batch) - before)

    monkeypatch.setattr(Engine, "_speculate", counted)
    sampling = GenerationParams(repetition_penalty=repetition_penalty)
    for prompt in PROMPTS:
        ids, text = expected(prompt, adapter, repetition_penalty=repetition_penalty)
        _assert_greedy(_submit(engine, lively, prompt, adapter=adapter, sampling=sampling), ids, text, prompt[:40])
    assert drafted and sum(kept) > len(drafted)  # drafts were taken, more than one token a round

    # Drafts from noisy logits, mostly wrong: the text is still fp32's.
    decode = Engine._decode_native
    noise = torch.Generator().manual_seed(0)

    def noisy(self, tokens, positions, *, kernel, slots=None):
        logits = decode(self, tokens, positions, kernel=kernel, slots=slots)
        if kernel != "int8":
            return logits
        return logits + 3 * logits.std() * torch.randn(logits.shape, generator=noise)

    monkeypatch.setattr(Engine, "_decode_native", noisy)
    drafted.clear(), kept.clear()
    for prompt in PROMPTS:
        ids, text = expected(prompt, adapter, repetition_penalty=repetition_penalty)
        _assert_greedy(_submit(engine, lively, prompt, adapter=adapter, sampling=sampling), ids, text, prompt[:40])
    assert sum(kept) < 2 * len(drafted)  # the drafts were wrong


def test_int8_answers_are_the_same_alone_and_in_a_shared_batch(lively, make_engine):
    """Drafting alone (a round of drafts, then a check) and in a full, refilled batch (plain
    fp32 steps): base and adapter rows, greedy and penalised, give the same tokens."""
    engine = make_engine(max_batch=5, quantize="int8")
    requests = [
        (
            prompt,
            {"adapter": adapter, "sampling": GenerationParams(repetition_penalty=penalty), "max_new_tokens": length},
        )
        for prompt in PROMPTS
        for adapter, penalty, length in ((None, 1.0, N), ("lora", 1.3, 17), ("rslora", 1.0, 25))
    ]
    alone = [_tokens(_submit(engine, lively, prompt, **options)) for prompt, options in requests]
    together = [_tokens(g) for g in _submit_together(engine, lively, requests)]
    for single, batched, request in zip(alone, together, requests, strict=True):
        [(single_completion, single_ids)] = single.values()
        [(batched_completion, batched_ids)] = batched.values()
        assert batched_ids == single_ids, request
        assert batched_completion.text == single_completion.text


def test_an_int8_seeded_sample_is_the_fp32_sample(lively, make_engine):
    """The check redraws with the sequence's own generator from where the round began: a
    seeded sample takes the same draws, so the same tokens, as on fp32."""
    full, quantized = make_engine(), make_engine(quantize="int8")
    for seed in (1, 2, 3):
        sampling = replace(SAMPLED, seed=seed)
        [(fp32, fp32_ids)] = _tokens(_submit(full, lively, PROMPTS[1], sampling=sampling)).values()
        [(int8, int8_ids)] = _tokens(_submit(quantized, lively, PROMPTS[1], sampling=sampling)).values()
        assert int8_ids == fp32_ids and int8.text == fp32.text


def test_int8_target_loss_is_the_fp32_loss(lively, make_engine):
    """The evaluation's loss on an int8 engine is fp32's: the tokens it serves are fp32's choices."""
    full, quantized = make_engine(), make_engine(quantize="int8")
    prompt_ids, target_ids = lively.ids(PROMPTS[0]), lively.ids(" a short answer to score, token by token.")
    loss, count = quantized.target_loss(prompt_ids, target_ids)
    assert count == len(target_ids)
    assert loss == full.target_loss(prompt_ids, target_ids)[0]


# --- Prefill in chunks ----------------------------------------------------------

STORY = (
    "A lighthouse keeper collects shells, rain, old maps and the songs of passing ships. "
    "Each morning she climbs two hundred steps, polishes the lens, and writes the weather in a green book. "
    "In winter the gulls sleep on the railings and the sea turns the colour of slate; in summer children row out "
    "from the village to trade apples for stories. One night a ship without lights drifts past the rocks, and "
    "she follows it along the coast with her lamp until dawn. Tell her story slowly, season by season, "
    "naming every tool she uses, every visitor who knocks, and every storm that shakes the tower. "
)
LONG = prompts.free_prompt(STORY * 2)  # 644 tokens of the tiny model's tokenizer
# Its first 330 tokens are LONG's: run after LONG, it starts from LONG's kept opening.
LONG_TOO = prompts.free_prompt(STORY + "Then tell it again as the gulls saw it.")


def _log_prefill(engine, monkeypatch, sequence):
    """The prefill passes of ``sequence``, as they run: a list of their token counts."""
    passes = []
    prefill = engine._prefill

    def logged(slot, running, count):
        if running is sequence:
            passes.append(count)
        return prefill(slot, running, count)

    monkeypatch.setattr(engine, "_prefill", logged)
    return passes


@pytest.mark.parametrize(
    "quantize,native,pace", [("none", True, 0.02), ("none", False, 0.02), ("int8", True, 0.1)], ids=str
)
def test_streams_get_a_token_every_step_while_a_long_prompt_prefills(
    lively, expected, make_engine, monkeypatch, quantize, native, pace
):
    """Two streams, in the slots either side of a long prompt: while the prompt runs, in chunks,
    every engine step gives each stream its next token (an int8 round: one or more), and no two
    chunks run without a step between them. Every text is transformers' greedy text."""
    engine = make_engine(quantize=quantize, native=native, prefill_chunk=80)  # the streams' prompts run at once
    slow_steps(engine, monkeypatch, pace)  # time to earn the long prompt's chunks: steps are counted, not timed
    log = []  # ("step", each stream's tokens before, after) and ("chunk", slot, (from, to)), in order
    step, prefill = engine._step, engine._prefill
    with engine._cond:  # the scheduler waits: nothing runs before the log is in place
        first, long, second = _submit_together(engine, lively, [(PROMPTS[0], {}), (LONG, {}), (PROMPTS[1], {})])
        streams, prompt = [first.sequences[0], second.sequences[0]], long.sequences[0]

        def logged_step():
            before = [len(s.tokens) for s in streams]
            step()
            log.append(("step", before, [len(s.tokens) for s in streams]))

        def logged_prefill(slot, sequence, count):
            if sequence is prompt:
                log.append(("chunk", slot, (sequence.position, sequence.position + count)))
            return prefill(slot, sequence, count)

        monkeypatch.setattr(engine, "_step", logged_step)
        monkeypatch.setattr(engine, "_prefill", logged_prefill)
    for generation, text_of in ((first, PROMPTS[0]), (second, PROMPTS[1]), (long, LONG)):
        _assert_greedy(generation, *expected(text_of), text_of[:40])

    spans = [span for kind, _, span in log if kind == "chunk"]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)) and spans[-1][1] == len(lively.ids(LONG))
    assert [b - a for a, b in spans[:-1]] == [80] * (len(spans) - 1) and len(spans) >= 7
    # Until the step that ended a stream: the streams' steps and the prompt's chunks, alternating.
    both = log[: next(i for i, (kind, *counts) in enumerate(log) if kind == "step" and N in counts[1])]
    chunks = [slot for kind, slot, _ in both if kind == "chunk"]
    assert chunks.count(1) == len(chunks) >= (len(spans) if quantize == "none" else 2)  # between slots 0 and 2
    assert all(a == "step" or b == "step" for (a, *_), (b, *_) in zip(both, both[1:], strict=False))
    for kind, before, after in both:
        gained = [b - a for a, b in zip(before, after, strict=True)] if kind == "step" else [1]
        assert all(g == 1 for g in gained) if quantize == "none" else all(g >= 1 for g in gained)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_chunked_prefill_gives_the_text_of_one_pass(lively, expected, make_engine, monkeypatch, adapter, sampling):
    """Prompts run in chunks of 5 tokens (after a reused opening, from wherever it ends) give the
    tokens of prompts run whole, and greedy text is transformers'."""
    chunked, whole = make_engine(prefill_chunk=5), make_engine(prefill_chunk=4096)
    reused = []
    prefix_reuse = chunked._prefix_reuse

    def logged(adapter, ids, slot):
        start = prefix_reuse(adapter, ids, slot)
        reused.append(start)
        return start

    monkeypatch.setattr(chunked, "_prefix_reuse", logged)
    for prompt in [*PROMPTS, LONG, LONG_TOO]:
        [(whole_completion, whole_ids)] = _tokens(
            _submit(whole, lively, prompt, adapter=adapter, sampling=sampling)
        ).values()
        [(completion, ids)] = _tokens(_submit(chunked, lively, prompt, adapter=adapter, sampling=sampling)).values()
        assert ids == whole_ids and completion.text == whole_completion.text, prompt[:40]
        if sampling is GREEDY:
            assert (ids, completion.text) == expected(prompt, adapter), prompt[:40]
    assert reused[-1] == 256 and any(0 < start % 5 for start in reused)  # LONG_TOO after LONG's opening


@pytest.mark.parametrize("end", ["cancelled", "timeout"])
def test_a_prompt_cancelled_or_timed_out_mid_prefill_frees_its_slot(lively, expected, make_engine, monkeypatch, end):
    """The long prompt's slot goes to the request waiting for one; the stream that ran next to it
    (moved into the freed slot) answers as it would alone."""
    engine = make_engine(max_batch=2, prefill_chunk=8)  # "hello" runs at once, the long prompt in 81 chunks
    slow_steps(engine, monkeypatch)
    timeout = 0.4 if end == "timeout" else 30
    with engine._cond:
        long, stream = _submit_together(engine, lively, [(LONG, {"timeout": timeout}), (PROMPTS[2], {})])
        passes = _log_prefill(engine, monkeypatch, long.sequences[0])
    waiting = _submit(engine, lively, PROMPTS[1])
    assert eventually(lambda: len(passes) >= 3)
    if end == "cancelled":
        long.cancel()
    [(completion, streamed)] = _collect(long).values()
    assert (completion.finish_reason, completion.tokens, streamed) == (end, 0, "")
    assert 3 <= len(passes) < len(lively.ids(LONG)) / 8
    ran_beside = _assert_greedy(stream, *expected(PROMPTS[2]), "stream")
    _assert_greedy(waiting, *expected(PROMPTS[1]), "waiting")
    assert waiting.sequences[0].started_at < ran_beside.finished_at  # it took the long prompt's slot
    assert eventually(lambda: engine.load() == (0, 0), timeout=1.0)


def test_a_failure_mid_prefill_reaches_every_client_and_the_engine_goes_on(lively, expected, make_engine, monkeypatch):
    engine = make_engine(prefill_chunk=8)
    slow_steps(engine, monkeypatch)
    prefill = engine._prefill

    def failing(slot, sequence, count):
        if sequence.position > 100:
            raise RuntimeError("the forward pass failed")
        return prefill(slot, sequence, count)

    monkeypatch.setattr(engine, "_prefill", failing)
    stream, long = _submit_together(engine, lively, [(PROMPTS[2], {}), (LONG, {})])
    for generation in (stream, long):
        with pytest.raises(RuntimeError, match="the forward pass failed"):
            _collect(generation)
    assert eventually(lambda: engine.load() == (0, 0), timeout=1.0)
    _assert_greedy(_submit(engine, lively, PROMPTS[1]), *expected(PROMPTS[1]), "after")


def _first_repeat(ids, n):
    """The index of the token of ``ids`` that first completes an n-gram ``ids`` held before; None without one."""
    return next((i for i in range(n, len(ids)) if tuple(ids[i - n + 1 : i + 1]) in set(_ngrams(ids[:i], n))), None)


def _ngrams(ids, n):
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def test_repeating_names_the_tokens_that_would_complete_an_earlier_ngram():
    from inference.engine.sampling import repeating

    assert repeating([5, 6, 7, 5, 6], 3) == {7}
    assert repeating([5, 6, 7, 5, 6, 9, 5, 6], 3) == {7, 9}
    assert repeating([5, 6, 7, 5, 6], 2) == {7}  # after 6: 7 once already
    assert repeating([5, 6, 7, 5, 6], 4) == set()  # 7 5 6 never went on before
    assert repeating([5, 5], 2) == {5} and repeating([5], 2) == set() and repeating([5, 6, 5], 0) == set()
    assert repeating([5, 6, 5], 1) == {5, 6}  # 1: no token twice


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_no_repeat_ngram_size_never_repeats_and_the_text_before_the_first_repeat_is_untouched(
    lively, make_engine, quantize
):
    """The repeated n-gram rule: no token n-gram twice in the generated text (the prompt not
    counted); up to the token that first repeated one, the text is the free text; an int8
    engine, alone or in a shared batch, gives the fp32 engine's text."""
    full, quantized = make_engine(), make_engine(max_batch=4, quantize=quantize)
    n, length = 3, N
    # A penalty below 1 favours the tokens already written: the tiny model loops.
    looping = GenerationParams(repetition_penalty=0.05)
    [(free, free_ids)] = _tokens(_submit(full, lively, PROMPTS[0], sampling=looping, max_new_tokens=length)).values()
    first = _first_repeat(free_ids, n)
    assert first is not None, f"the free text repeats no 3-gram: nothing to check {free_ids}"
    rule = GenerationParams(repetition_penalty=0.05, no_repeat_ngram_size=n)
    [(ruled, ruled_ids)] = _tokens(_submit(full, lively, PROMPTS[0], sampling=rule, max_new_tokens=length)).values()
    assert ruled_ids[:first] == free_ids[:first] and ruled_ids[first] != free_ids[first]
    assert _first_repeat(ruled_ids, n) is None and len(ruled_ids) > first + n
    # The prompt's own n-grams may be written again (the product's name, its attributes).
    prompt_grams = set(_ngrams(lively.ids(PROMPTS[0]), n))
    assert prompt_grams & set(_ngrams(free_ids[:first], n)) <= set(_ngrams(ruled_ids, n))
    requests = [(PROMPTS[0], {"sampling": rule, "max_new_tokens": length}), (PROMPTS[1], {"max_new_tokens": length})]
    together = _submit_together(quantized, lively, requests * 2)
    answers = [_tokens(generation)[0] for generation in together]
    assert answers[0][1] == answers[2][1] == ruled_ids and answers[0][0].text == ruled.text
    free_second = _tokens(_submit(full, lively, PROMPTS[1], max_new_tokens=length))[0][1]
    assert answers[1][1] == answers[3][1] == free_second  # its neighbour's rule is its own
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be 0 \\(off\\) or more"):
        GenerationParams(no_repeat_ngram_size=-1)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_min_new_tokens_holds_the_end_back_and_the_text_before_it_is_untouched(lively, make_engine, quantize):
    """The length floor: no end-of-text token before min_new_tokens; up to where the text would
    have ended it is the text without the floor; an int8 engine, alone or in a shared batch, gives
    the fp32 engine's text, and a neighbour without the floor still ends where it would."""
    [(_, free_ids)] = _tokens(_submit(make_engine(), lively, PROMPTS[0])).values()
    # Engines whose end-of-text token is one that the free text writes early: their text ends there.
    end = free_ids[5]
    first = free_ids.index(end)
    full = make_engine(stop_token_ids=[end])
    quantized = make_engine(max_batch=4, quantize=quantize, stop_token_ids=[end])
    [(short, short_ids)] = _tokens(_submit(full, lively, PROMPTS[0])).values()
    assert short.finish_reason == "stop" and short_ids == free_ids[: first + 1]
    floor = first + 12
    held = GenerationParams(min_new_tokens=floor)
    [(long, long_ids)] = _tokens(_submit(full, lively, PROMPTS[0], sampling=held)).values()
    assert long_ids[:first] == free_ids[:first] and end not in long_ids[:floor]
    assert len(long_ids) > floor and long.text.startswith(short.text)
    requests = [(PROMPTS[0], {"sampling": held}), (PROMPTS[0], {})]
    answers = [_tokens(generation)[0] for generation in _submit_together(quantized, lively, requests * 2)]
    assert answers[0][1] == answers[2][1] == long_ids and answers[0][0].text == long.text
    assert answers[1][1] == answers[3][1] == short_ids  # its neighbour's floor is not its own
    # A floor past max_new_tokens: the text runs to the limit.
    [(cut, cut_ids)] = _tokens(_submit(full, lively, PROMPTS[0], sampling=held, max_new_tokens=first + 3)).values()
    assert cut.finish_reason == "length" and end not in cut_ids and len(cut_ids) == first + 3
    with pytest.raises(ValueError, match="min_new_tokens must be 0 \\(off\\) or more"):
        GenerationParams(min_new_tokens=-1)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_banned_sequences_never_complete_and_the_rest_of_the_text_is_untouched(lively, make_engine, quantize):
    """The fact guard's mask (engine/sampling.py: BannedSequences): a banned sequence's last token
    is never given out after its others; the text before that point is the unguarded text, and an
    int8 engine, alone or in a shared batch, gives the fp32 engine's guarded text."""
    from inference.engine.sampling import BannedSequences

    full, quantized = make_engine(), make_engine(max_batch=4, quantize=quantize)
    [(free, free_ids)] = _tokens(_submit(full, lively, PROMPTS[0])).values()
    # Ban the free text's 4th token after its 3rd (a two-token sequence) and its 7th anywhere.
    banned = BannedSequences(anywhere=[tuple(free_ids[2:4]), (free_ids[6],)])
    [(guarded, guarded_ids)] = _tokens(_submit(full, lively, PROMPTS[0], banned=banned)).values()
    assert guarded_ids[:3] == free_ids[:3] and guarded_ids[3] != free_ids[3]
    assert free_ids[6] not in guarded_ids
    assert not any(guarded_ids[i : i + 2] == free_ids[2:4] for i in range(len(guarded_ids) - 1))
    together = _submit_together(
        quantized, lively, [(PROMPTS[0], {"banned": banned}), (PROMPTS[1], {}), (PROMPTS[0], {"banned": banned})]
    )
    answers = [_tokens(generation)[0] for generation in together]
    assert answers[0][1] == answers[2][1] == guarded_ids and answers[0][0].text == guarded.text
    assert answers[1][1] == _tokens(_submit(full, lively, PROMPTS[1]))[0][1]  # its neighbours' bans are theirs
