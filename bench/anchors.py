"""Other runtimes on serve_bench's prompts (``serve_bench.py --anchors``): where the engine stands
against runtimes built for this job, not only against ``model.generate``.

Each runner gets the prompts serve_bench's other rows get, tokenized as the engine tokenizes them
(the base's tokenizer, no special tokens added: the prompt builder's text already holds them), decodes
greedily, stops at the tokens ``model.generate`` stops at or after ``new_tokens``, and returns
measurements (the arguments of serve_bench's ``summary()``, plus ``single``): serve_bench makes the
rows. Tokens are counted as the baseline counts them: the generated ones, the stop token included,
the prompt's never. Texts are decoded by the base's tokenizer the way the baseline decodes, so the
"same text" column compares token choices, not two detokenizers.

- CTranslate2 (``ctranslate2``): the base converted once with its TransformersConverter to float32
  (setup, not timed), loaded with ``compute_type`` float32 or int8 (CTranslate2 quantizes at load),
  ``intra_threads`` = serve_bench's ``--threads``. One at a time: ``generate_batch`` with one prompt,
  the prompt forwarded at once (``include_prompt_in_result=False``). N at once: the same work as the
  engine's row, ``clients`` copies of every prompt in one ``generate_batch`` call with
  ``max_batch_size=clients`` (the engine's batch cap): CTranslate2 sorts them by length and runs the
  batches one after the other, its own way of serving many requests on one thread pool. Each
  request's latency ends at its last token (the step callback's ``is_last``).
- llama.cpp (``llama-cpp-python``, optional): the GGUF the base was prepared from (its recorded
  source, ``gguf:<package>``), fed the token ids above, not text (``Llama.generate`` takes ids; the
  bench checks that llama.cpp's own tokenizer gives the same ids and reports it), ``n_threads`` =
  ``--threads``, temperature 0 (llama.cpp's greedy sampler), no repetition penalty. llama-cpp-python
  keeps one sequence per ``Llama`` object, so its "N at once" row says n/a rather than a number. It
  reuses the keys and values of the prompt prefix it shares with the previous request, as it does
  when serving (the engine keeps prompt prefixes too; CTranslate2 here does not).
"""

import importlib.util
import json
import shutil
import statistics
import time
from pathlib import Path

LLAMA_CPP_INSTALL = (
    "llama.cpp anchor skipped: llama-cpp-python is not installed; "
    'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 (compiles llama.cpp, ~12 min on 2 cores)'
)
CTRANSLATE2_INSTALL = "CTranslate2 anchor skipped: ctranslate2 is not installed; pip install -r requirements/bench.txt"


def available(module):
    """Whether ``module`` can be imported, without importing it (they load native libraries)."""
    return importlib.util.find_spec(module) is not None


def _tokenized(base_dir, prompts):
    from transformers import AutoTokenizer

    from inference.loader import _stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return tokenizer, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], _stop_token_ids(tokenizer)


def _one_at_a_time(name, one, inputs, tokenizer, stops):
    """The one-stream row: ``one(input)`` -> (generated ids, seconds to the first token) for each
    input in turn, after an untimed warm-up on the first."""
    one(inputs[0])  # warm-up, untimed
    latencies, texts, tokens, ttfts = [], [], 0, []
    started = time.perf_counter()
    for item in inputs:
        t = time.perf_counter()
        generated, ttft = one(item)
        latencies.append(time.perf_counter() - t)
        ttfts.append(ttft)
        text, count = _finished(tokenizer, generated, stops)
        texts.append(text)
        tokens += count
    return {"name": name, "latencies": latencies, "tokens": tokens, "single": True,
            "wall": time.perf_counter() - started, "texts": texts, "ttft": statistics.median(ttfts)}  # fmt: skip


def _finished(tokenizer, generated, stops):
    """(text, tokens) of one generation, as serve_bench's baseline makes them."""
    cut = next((i for i, token in enumerate(generated) if token in stops), None)
    kept = generated if cut is None else generated[:cut]
    return tokenizer.decode(kept, skip_special_tokens=True).strip(), len(generated) if cut is None else cut + 1


# --- CTranslate2 --------------------------------------------------------------


def ctranslate2_convert(base_dir, cache_root):
    """The base as a CTranslate2 float32 model under ``cache_root``, converted on first use only
    (keyed by the base's manifest hash and the CTranslate2 version)."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    base_dir = Path(base_dir)
    sha = json.loads((base_dir / "manifest.json").read_text())["sha256"][:12]
    target = Path(cache_root) / f"{base_dir.name}-{sha}-ct2-{ctranslate2.__version__}"
    if (target / "model.bin").is_file():
        return str(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    TransformersConverter(str(base_dir), low_cpu_mem_usage=True).convert(str(partial), quantization="float32")
    partial.rename(target)  # whole or absent: a killed conversion is never taken for a model
    return str(target)


def ctranslate2_run(model_dir, base_dir, prompts, new_tokens, compute_type, clients, threads):
    """[one at a time, ``clients`` at once] measurements for one compute type."""
    import ctranslate2

    tokenizer, ids, stops = _tokenized(base_dir, prompts)
    generator = ctranslate2.Generator(
        model_dir, device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
    )
    starts = [tokenizer.convert_ids_to_tokens(prompt_ids) for prompt_ids in ids]
    options = {
        "max_length": new_tokens,
        "sampling_topk": 1,
        "end_token": stops,
        "return_end_token": True,
        "include_prompt_in_result": False,
    }

    def one(start):
        first = []

        def step(result):
            if not first:
                first.append(time.perf_counter())
            return False

        t = time.perf_counter()
        generated = generator.generate_batch([start], callback=step, **options)[0].sequences_ids[0]
        return generated, first[0] - t

    name = f"ctranslate2 {compute_type}"
    single = _one_at_a_time(f"{name}, one at a time", one, starts, tokenizer, stops)

    batch = [start for _ in range(clients) for start in starts]
    ended = [None] * len(batch)

    def last(result):
        if result.is_last:
            ended[result.batch_id] = time.perf_counter()
        return False

    started = time.perf_counter()
    results = generator.generate_batch(batch, max_batch_size=clients, callback=last, **options)
    wall = time.perf_counter() - started
    tokens = sum(_finished(tokenizer, r.sequences_ids[0], stops)[1] for r in results)
    if None in ended:
        raise RuntimeError("CTranslate2 gave no last step for some requests: their latencies are unknown")
    latencies = [end - started for end in ended]
    batched = {"name": f"{name}, {clients} at once", "latencies": latencies, "tokens": tokens, "wall": wall,
               "single": False}  # fmt: skip
    return [single, batched]


# --- llama.cpp ----------------------------------------------------------------


def llama_cpp_gguf(base_dir):
    """The GGUF file the base was prepared from, or None when its source was not a GGUF."""
    from finetuning.services.base_model import BaseModelError, source_resolve

    source = json.loads((Path(base_dir) / "genapi.json").read_text()).get("source", "")
    try:
        resolved = source_resolve(source)
    except BaseModelError:
        return None
    return str(Path(resolved.location) / resolved.gguf_file) if resolved.gguf_file else None


def llama_cpp_run(gguf, base_dir, prompts, new_tokens, threads):
    """[one at a time] measurements, and how many prompts llama.cpp's tokenizer splits as the base's."""
    from llama_cpp import Llama

    tokenizer, ids, stops = _tokenized(base_dir, prompts)
    llm = Llama(model_path=gguf, n_ctx=max(map(len, ids)) + new_tokens + 8, n_threads=threads,
                n_threads_batch=threads, seed=0, verbose=False)  # fmt: skip
    same_ids = sum(
        llm.tokenize(p.encode(), add_bos=False, special=True) == i for p, i in zip(prompts, ids, strict=True)
    )

    def one(prompt_ids):
        generated, first = [], None
        t = time.perf_counter()
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter() - t
            generated.append(token)
            if token in stops or len(generated) >= new_tokens:
                break
        return generated, first

    name = f"llama.cpp {Path(gguf).stem.rsplit('.', 1)[-1]}, one at a time"
    single = _one_at_a_time(name, one, ids, tokenizer, stops)
    return [single], same_ids
