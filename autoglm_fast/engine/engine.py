"""`Engine`: continuous batching over the paged KV cache, sampling, streaming.

    engine = Engine.from_preset("nano")                        # or Engine.from_pretrained(dir)
    for out in engine.stream(messages=[{"role": "user", "content": "hi"}]):
        print(out.text, end="")

Requests join and leave between steps; each step runs every decoding request's next token and
spends the rest of the token budget on prefill chunks (see scheduler.py), starting new requests on
whatever the prefix cache holds of them. Media are preprocessed when a request is added (bad media
fail that request alone) and encoded once, before it is first scheduled (on CUDA on an encoder
stream, while the running requests keep stepping). On CUDA a decode step is one graph, sampling
included (cuda_graphs.py), and prefill / mixed steps run as piecewise graphs (piecewise_graphs.py).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import time
from pathlib import Path
from typing import Iterator

import torch

from ..families import family_for_checkpoint, family_for_model, family_for_preset
from ..kernels.utils import device_supported
from ..paged_cache import PagedKVCache
from ..prefix_cache import extend_block_hashes
from ..quant.awq import checkpoint_awq_settings
from ..quant.quantize import resolve as resolve_quantization
from ..sampling import SamplingParams, SamplingPlan, make_generator, pack, unpack
from ..tokenizer import BYTES, IncrementalDetokenizer, Tokenizer, find_tokenizer, load_tokenizer
from ..weights import group_align
from .batch import PersistentBatch
from .request import Request, RequestOutput, Status
from .runner import FastRunner, ReferenceRunner
from .scheduler import Scheduler, SchedulerConfig


class Engine:
    def __init__(self, model, tokenizer: Tokenizer | str | None = None, *,
                 backend: str | None = None, num_blocks: int | None = None, block_size: int = 32,
                 scheduler: SchedulerConfig | None = None, cuda_graphs: bool | None = None,
                 enable_prefix_caching: bool | None = None, checkpoint: str | Path | None = None,
                 tensor_parallel_size: int = 1, **family_options):
        """model: any family's model (families/__init__.py); its runtime is the engine's view of it.
        cuda_graphs: replay decode steps from captured graphs (fast backend; default: on CUDA).
        True on a CPU runs the same static-buffer path eagerly (what the graphs would replay).
        What decode actually got is `graph_state` ("captured", "fallback" with its reason, ...).
        enable_prefix_caching: reuse the KV blocks of earlier requests' identical prefixes (media
        included; see prefix_cache.py). Default on for the fast backend; the reference backend keeps
        a private cache per request and cannot share.
        checkpoint, family_options: passed to the family's runtime (its processor files, e.g.
        mm_processor_kwargs for GLM-4.1V).
        tensor_parallel_size: only 1 here (this engine serves the model it is given); for N ranks use
        from_preset / from_pretrained(..., tensor_parallel_size=N), where each rank builds its own shard."""
        if tensor_parallel_size != 1:
            raise ValueError("Engine(model) serves the model it is given on one device; for tensor_parallel_size="
                             f"{tensor_parallel_size} use Engine.from_preset or Engine.from_pretrained, where each "
                             "rank builds and loads only its own shard")
        # A tensor-parallel rank's model (parallel/): rank 0 runs this engine and its scheduler and sends each
        # step's plan to the workers (self.driver, set by parallel/launch.py); a worker follows (`follow`).
        self.parallel, self.driver = getattr(model, "tensor_parallel", None), None
        self.runtime = family_for_model(model).runtime_cls(model, checkpoint, **family_options)
        param = self.runtime.embed_tokens.weight  # never quantized: the activations' dtype
        self.device, self.dtype = param.device, param.dtype
        backend = backend or ("fast" if device_supported(self.device) else "reference")
        if backend not in ("fast", "reference"):
            raise ValueError(f"backend must be 'fast' or 'reference', got {backend!r}")
        self.model, self.config, self.backend = model.eval(), model.config, backend
        # tokenizer: a Tokenizer, "bytes" or a tokenizer.json path; default the byte tokenizer (presets)
        self.tokenizer = load_tokenizer(None, model.config, BYTES if tokenizer is None else tokenizer)
        self.sched_config = scheduler or SchedulerConfig()
        text = self.config.text
        if num_blocks is None:  # room for every sequence at full length by default
            per_seq = -(-self.sched_config.max_model_len // block_size)
            num_blocks = per_seq * self.sched_config.max_num_seqs + 1  # + the graphs' null block
        if enable_prefix_caching and backend == "reference":
            raise ValueError("enable_prefix_caching needs the fast backend (the reference runner keeps a private "
                             "KV cache per request)")
        self.cache = PagedKVCache(text, num_blocks, block_size, self.dtype, self.device,
                                  with_pools=backend == "fast",
                                  enable_prefix_caching=backend == "fast" and enable_prefix_caching is not False)
        self.batch = PersistentBatch(self.runtime, self.cache, self.sched_config.max_num_seqs,
                                     self.sched_config.max_model_len, self.tokenizer.eos_token_ids)
        self.encoder_graphs = None  # EncoderGraphs where decode has graphs too
        if backend == "fast":
            from ..fast import apply_fast_kernels
            apply_fast_kernels(model)
            graphs = pieces = None
            if cuda_graphs if cuda_graphs is not None else self.device.type == "cuda":
                from .cuda_graphs import DecodeGraphs
                from .encoder_graphs import EncoderGraphs
                from .piecewise_graphs import PiecewiseGraphs
                capture = self.device.type == "cuda"
                graphs = DecodeGraphs(self.runtime, self.cache, self.batch, self.sched_config.max_model_len, capture)
                pieces = PiecewiseGraphs(self.runtime, self.cache, self.sched_config.max_num_batched_tokens, capture)
                self.encoder_graphs = EncoderGraphs(capture)
                self.runtime.graph_encoders(self.encoder_graphs)
            self.runner = FastRunner(self.runtime, self.cache, graphs, pieces)
        else:
            self.runner = ReferenceRunner(self.runtime, self.cache, self.sched_config.max_model_len)
        self.scheduler = Scheduler(self.sched_config, self.cache)
        # Encoders overlap decoding on their own stream; tensor-parallel ranks encode in step order instead
        # (their embedding lookup is a collective), when a request is first scheduled.
        overlap = self.device.type == "cuda" and self.parallel is None
        self._encoder_stream = torch.cuda.Stream(self.device) if overlap else None
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, *, seed: int = 0, dtype: torch.dtype | None = None,
                    device: str | None = None, load_vision: bool = True, load_audio: bool = True,
                    quantization: str | None = None, quantize_vision: bool = False, tensor_parallel_size: int = 1,
                    _tensor_parallel=None, **kwargs) -> "Engine":
        """A preset with seeded random weights (benchmarks, tests, demos). quantization: "int8" / "int4"
        weight-only, round to nearest, each layer as it is made (quant/quantize.py: the decoder's linears,
        lm_head in int8; the towers too with quantize_vision). tensor_parallel_size: N ranks (parallel/;
        this process is rank 0 and spawns the others), the same weights as one."""
        if tensor_parallel_size != 1:
            from ..parallel.launch import launch
            return launch(functools.partial(cls.from_preset, name, seed=seed, dtype=dtype, load_vision=load_vision,
                                            load_audio=load_audio, quantization=quantization,
                                            quantize_vision=quantize_vision, **kwargs), tensor_parallel_size, device,
                          family_for_preset(name).preset(name),
                          group_align(resolve_quantization(quantization, quantize_vision)))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        family = family_for_preset(name)
        model = family.model_cls.from_config(family.preset(name), seed=seed, dtype=dtype, device=device,
                                             quantization=resolve_quantization(quantization, quantize_vision),
                                             tensor_parallel=_tensor_parallel)
        engine = cls(model, **kwargs)
        engine.runtime.drop_encoders(**_wanted(load_vision, load_audio))
        return engine

    @classmethod
    def from_pretrained(cls, directory, *, dtype: torch.dtype | None = None, device: str | None = None,
                        load_vision: bool = True, load_audio: bool = True,
                        tokenizer: Tokenizer | str | None = None, quantization: str | None = None,
                        quantize_vision: bool = False, tensor_parallel_size: int = 1, _tensor_parallel=None,
                        **kwargs) -> "Engine":
        """tokenizer: default the checkpoint's own (tokenizer.json, or the byte-tokenizer marker
        `save_pretrained` writes; neither is a TokenizerNotFoundError), "bytes", a path or a Tokenizer.
        quantization: "int8" / "int4" weight-only, quantized shard by shard as the weights load (see
        from_preset). An AWQ checkpoint (quantization_config in its config.json) loads quantized as it is.
        tensor_parallel_size: N ranks, each reading only its shards of the safetensors files (see from_preset)."""
        quant = resolve_quantization(quantization, quantize_vision)  # before the weights: fail fast
        if not isinstance(tokenizer, Tokenizer) and Path(directory).is_dir():
            tokenizer = find_tokenizer(directory, tokenizer)  # before the weights: fail fast
        if tensor_parallel_size != 1:
            from ..parallel.launch import launch
            return launch(functools.partial(cls.from_pretrained, directory, dtype=dtype, load_vision=load_vision,
                                            load_audio=load_audio, tokenizer=tokenizer, quantization=quantization,
                                            quantize_vision=quantize_vision, **kwargs), tensor_parallel_size, device,
                          family_for_checkpoint(directory).load_config(directory),
                          group_align(quant, checkpoint_awq_settings(directory)))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = family_for_checkpoint(directory).model_cls.from_pretrained(directory, dtype=dtype, device=device,
                                                                           quantization=quant,
                                                                           tensor_parallel=_tensor_parallel)
        engine = cls(model, load_tokenizer(directory, model.config, tokenizer), checkpoint=directory, **kwargs)
        engine.runtime.drop_encoders(**_wanted(load_vision, load_audio))
        return engine

    def save_pretrained(self, directory, max_shard_size: int | str = "2GB") -> None:
        """The model's checkpoint plus this engine's tokenizer: `from_pretrained(directory)` needs no option."""
        self.model.save_pretrained(directory, max_shard_size, tokenizer=self.tokenizer)

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
                    messages: list[dict] | None = None, images=(), audio=(), enable_thinking: bool = True,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. `prompt` is text (media blocks are put before it) or token
        ids (placeholders included); `messages` are OpenAI-style chat messages whose image / audio
        parts carry the media under "image" / "audio" (a path, bytes, a PIL image or samples).
        Raises ValueError / TypeError for bad input; nothing is queued then."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if (prompt is None) == (messages is None):
            raise ValueError("pass exactly one of prompt and messages")
        ids, media = self.runtime.prepare(self.tokenizer, prompt=prompt, messages=messages, images=images,
                                          audio=audio, enable_thinking=enable_thinking)
        if not ids:
            raise ValueError("the prompt is empty")
        limit = self.sched_config.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {limit}")
        if self.cache.blocks_needed(None, len(ids) + 1) > self.cache.capacity:
            raise ValueError(f"the prompt ({len(ids)} tokens) does not fit in the KV cache")
        self._enqueue(request_id, ids, media, params)
        return request_id

    def _enqueue(self, request_id: str, ids: list[int], media: dict, params: SamplingParams) -> None:
        """Queue a checked, prepared request (a tensor-parallel worker gets these from rank 0)."""
        if self.driver is not None:
            self.driver.commands.append(("add", request_id, ids, media, params))
        req = Request(request_id, ids, params, media=media)
        if self.cache.prefix_caching:
            req.media_keys = self.runtime.cache_keys(ids, media)
            extend_block_hashes(req.block_hashes, ids, self.cache.block_size, req.media_keys)
        if params.seed is not None:
            req.generator = make_generator(params.seed, self.device)
        req.detokenizer = IncrementalDetokenizer(self.tokenizer)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and req.status is not Status.FINISHED:
            if self.driver is not None:
                self.driver.commands.append(("abort", request_id))
            req.finish("abort")
            self._release(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def is_worker(self) -> bool:
        """A tensor-parallel rank other than 0: it follows rank 0's steps and samples nothing of its own."""
        return self.parallel is not None and self.parallel.rank > 0

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do for one device); the engine cannot step after."""
        if self.driver is not None:
            self.driver.close()

    @property
    def graph_state(self):
        """A GraphState: "captured" (decode replays CUDA graphs), "fallback" (a capture failed: eager
        decoding, `reason` says why), "pending" (no decode step yet) or "off" (not requested, no CUDA)."""
        from .cuda_graphs import GraphState
        graphs = getattr(self.runner, "graphs", None)
        if graphs is not None:
            return graphs.state
        return GraphState("off", "the reference backend" if self.backend == "reference" else "not requested")

    # ---- the step --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return an output for every request that moved (or finished)."""
        if self.driver is None:
            self._encode_waiting()
            return self._execute(self.scheduler.schedule())
        # tensor parallel: every worker runs the same plan; requests are encoded when first scheduled, on
        # every rank alike (the embedding lookup is a collective), so nothing is encoded ahead
        with self.driver.stepping():
            plan = self.scheduler.schedule()
            self.driver.send(plan)
            return self._execute(plan)

    @torch.inference_mode()
    def follow(self, message) -> None:
        """A tensor-parallel worker's step: rank 0's message (parallel/worker.py) applied in rank 0's order -
        the tokens it sampled last step, the requests added and aborted since, then its plan - so this rank's
        requests, KV cache and persistent batch stay those of rank 0."""
        rows, tokens = [], []
        for request_id, token in message.sampled:
            req = self.requests[request_id]
            self._append(req, token, None, [])
            if req.status is Status.FINISHED:
                self._finalize(req)
            elif request_id in self.batch.row_of:  # what the next decode step embeds
                rows.append(self.batch.row_of[request_id])
                tokens.append(token)
        if rows:
            rows, tokens = (torch.tensor(x, device=self.device) for x in (rows, tokens))
            self.batch.sampling.last_token[rows] = tokens
        for command, request_id, *args in message.commands:
            self._enqueue(request_id, *args) if command == "add" else self.abort(request_id)
        self._execute(self.scheduler.follow(message.preempted, message.scheduled, self.requests))

    def _execute(self, plan) -> list[RequestOutput]:
        for req in plan.preempted:
            self.runner.release(req)
            self.batch.remove(req)
        decodes, chunks = [], []  # decode rows first: attention splits a mixed step there
        for req, n in zip(plan.requests, plan.num_tokens):
            if req.prompt_embeds is None and not self._admit(req, overlap=False):  # not encoded ahead
                continue
            self.batch.add(req)
            (decodes if n == 1 else chunks).append((req, n))
        outputs = [self._finalize(r) for r in list(self.requests.values()) if r.status is Status.FINISHED]
        if not decodes and not chunks:
            return outputs
        requests, counts = [r for r, _ in decodes + chunks], [n for _, n in decodes + chunks]
        generating = not chunks and all(r.num_computed >= len(r.prompt_ids) for r in requests)
        if generating and self.runner.can_decode(requests):  # the whole step on the device
            sampled, below = requests, self._below_min(requests)
            rows = self.runner.decode(requests, SamplingPlan.of([r.params for r in requests], below), below,
                                      [r.generator for r in requests])
        else:
            logits = self.runner.run(requests, counts)
            if self.runner.graphs is not None:  # the blocks this step added, for the graphs' tables
                self.batch.sync_block_tables(requests)
            done = [i for i, (r, n) in enumerate(zip(requests, counts)) if r.remaining == n]  # the prompt is all in
            sampled = [requests[i] for i in done]
            rows = self._sample(logits[done], sampled) if done and not self.is_worker else []
        for req, n in zip(requests, counts):
            req.num_computed += n
            self.cache.commit(req.request_id, req.block_hashes)
        if self.is_worker:
            return []  # rank 0's tokens arrive with the next step's message
        for req, row in zip(sampled, rows):
            token, logprob, top = unpack(row, req.params)
            self._append(req, token, logprob, top)
            if self.driver is not None:
                self.driver.sampled.append((req.request_id, token))
            outputs.append(self._finalize(req) if req.status is Status.FINISHED else req.take_output())
        return outputs

    def _below_min(self, requests: list[Request]) -> list[bool]:
        return [len(r.output_ids) < r.params.min_tokens for r in requests]

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[list[float]]:
        """Eager sampling of the rows of a prefill or mixed step (one read-back)."""
        below = self._below_min(requests)
        dev = logits.device
        out = self.batch.sampling.sample(logits, torch.tensor(self.batch.rows(requests), device=dev),
                                         SamplingPlan.of([r.params for r in requests], below),
                                         torch.tensor(below, device=dev), [r.generator for r in requests])
        return pack(out).tolist()

    def _encode_waiting(self) -> None:
        """Run the encoders of the requests next in line, once each, on the encoder stream (CUDA), so the
        step's decodes never queue behind them; the scheduler takes a request once its encoding is done
        (Request.ready). A failure ends that request alone."""
        for req in list(self.scheduler.waiting)[:self.sched_config.max_num_seqs]:
            if req.prompt_embeds is None:
                self._admit(req)

    def _admit(self, req: Request, overlap: bool = True) -> bool:
        """Run a request's encoders (overlap: on the encoder stream where there is one); False if they failed,
        which ends that request alone."""
        stream = self._encoder_stream if overlap else None
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self.runtime.admit(req)
            if stream is not None:
                req.encoded = self._encoder_stream.record_event()
                _used_on(torch.cuda.current_stream(self.device), req.prompt_embeds, req.state)
            return True
        except (ValueError, TypeError, RuntimeError) as e:
            req.finish("error", f"{type(e).__name__}: {e}")
            self._release(req)
            return False

    def _append(self, req: Request, token: int, logprob: float | None, top: list) -> None:
        p = req.params
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.output_ids.append(token)
        if self.cache.prefix_caching and req.total_len % self.cache.block_size == 0:  # a block filled
            extend_block_hashes(req.block_hashes, req.all_ids, self.cache.block_size, req.media_keys)
        if p.logprobs is not None:
            req.pending_logprobs.append({"token_id": token, "logprob": logprob, "top": top})
        is_eos = token in self.tokenizer.eos_token_ids and not p.ignore_eos
        before = len(req.text)
        if not is_eos:
            req.text += req.detokenizer.push(token)
        hit = _find_stop(req.text, p.stop, before)
        if hit is not None:
            req.text = req.text[:hit]
            req.finish("stop")
        elif is_eos or token in p.stop_token_ids:
            req.finish("stop")
        elif len(req.output_ids) >= p.max_tokens or req.total_len >= self.sched_config.max_model_len:
            req.finish("length")
        if req.status is Status.FINISHED and req.finish_reason != "stop":
            req.text += req.detokenizer.flush()

    def _finalize(self, req: Request) -> RequestOutput:
        self._release(req)
        self.requests.pop(req.request_id, None)
        return req.take_output()

    def _release(self, req: Request) -> None:
        self.scheduler.remove(req)
        self.runner.release(req)
        self.batch.remove(req)

    # ---- convenience -------------------------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                 **kwargs) -> list[RequestOutput]:
        """Run prompts to completion (batched); one final output each, with the full text and tokens."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp, **kwargs) for p, sp in zip(prompts, params_list)]
        results = {i: RequestOutput(i, "", []) for i in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in results:
                    _merge(results[out.request_id], out)
        return [results[i] for i in ids]

    def stream(self, prompt=None, params: SamplingParams | None = None, **kwargs) -> Iterator[RequestOutput]:
        """Yield this request's incremental outputs (other queued requests progress alongside)."""
        rid = self.add_request(prompt, params, **kwargs)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(rid)  # a consumer that stops early frees the request


def _used_on(stream, *objects) -> None:
    """Tell the caching allocator that tensors made on the encoder stream are read on `stream`, so their
    memory is not handed out again while `stream` may still use it."""
    for obj in objects:
        fields = (obj,) if isinstance(obj, torch.Tensor) or not hasattr(obj, "__dict__") else vars(obj).values()
        for t in fields:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(stream)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the first stop string begins (searching from a little before `start`), or None."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _merge(total: RequestOutput, out: RequestOutput) -> None:
    total.text += out.text
    total.token_ids += out.token_ids
    total.finished, total.finish_reason, total.error = out.finished, out.finish_reason, out.error
    total.prompt_tokens, total.completion_tokens = out.prompt_tokens, out.completion_tokens
    total.cached_tokens = out.cached_tokens
    if out.logprobs:
        total.logprobs = (total.logprobs or []) + out.logprobs


def _wanted(load_vision: bool, load_audio: bool) -> dict[str, bool]:
    """drop_encoders' arguments: only what was turned off (a family without audio has nothing to drop)."""
    return {k: False for k, keep in (("vision", load_vision), ("audio", load_audio)) if not keep}
