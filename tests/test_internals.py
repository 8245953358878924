"""The private hooks of the stack the project relies on, where no public API does the job. Each
test fails loudly, naming what changed, when a new version of the library moves the hook.

- Prefect: how a served run's process starts (`service.warm`), `run_flow_in_subprocess` of
  `prefect.runner._starter_direct` (the override point of its `DirectSubprocessStarter`); the
  executor a warm worker runs its runs through (`service.worker`), as Prefect's process worker
  does: `FlowRunExecutorContext.create_executor`, its control channel, `ProcessHandle`; and
  the cache of the objects a run's events name (`prefect.events.related.RESOURCE_CACHE`),
  which the warm worker fills for its runs.
- transformers: what generate() will use for a pipeline call (`tasks.generate`), the pipeline's
  `_prepare_generate_kwargs` and `GenerationConfig._get_default_generation_params`; for
  batched prompts (`tasks.batching`), `_prepare_generation_config` and the order of the
  sampling warpers in `_get_logits_processor`, and how `_sample` draws.
- torch: oneDNN's packed linear weights (`tasks.packing`).
- uvicorn: the open connections of a server, which the receiver's deadline watches.
"""

from __future__ import annotations

import inspect


def test_prefects_subprocess_starter_keeps_its_override_point() -> None:
    import prefect.flow_engine as engine
    import prefect.runner._starter_direct as starter

    assert callable(starter.run_flow_in_subprocess), (
        "prefect.runner._starter_direct.run_flow_in_subprocess is gone: warm starts "
        "(deployments/service/warm.py) need another way to start served runs"
    )
    assert callable(engine.run_flow_in_subprocess)
    assert "multiprocessing" in vars(engine), "the flow engine no longer uses multiprocessing"


def test_prefects_process_worker_keeps_the_executor_the_warm_worker_uses() -> None:
    from prefect.runner._control_channel import ControlChannel
    from prefect.runner._flow_run_executor import FlowRunExecutorContext, ProcessStarter
    from prefect.runner._process_manager import ProcessHandle

    create = inspect.signature(FlowRunExecutorContext.create_executor).parameters
    assert {"flow_run", "starter", "resolve_flow", "propose_submitting"} <= set(create), (
        "FlowRunExecutorContext.create_executor changed (deployments/service/worker.py)"
    )
    start = inspect.signature(ProcessStarter.start).parameters
    assert list(start)[1:] == ["flow_run", "task_status"], "Prefect's ProcessStarter changed"
    assert {"register", "unregister"} <= set(vars(ControlChannel)), "ControlChannel changed"
    handle = inspect.signature(ProcessHandle).parameters.values()
    required = [p for p in handle if p.default is inspect.Parameter.empty]
    assert len(required) == 1, "ProcessHandle no longer wraps a process alone"


def test_transformers_says_what_generate_will_use() -> None:
    from transformers import GenerationConfig
    from transformers.pipelines.text_generation import TextGenerationPipeline

    defaults = GenerationConfig._get_default_generation_params()
    assert {"do_sample", "temperature", "top_k", "top_p", "num_beams", "max_length"} <= set(
        defaults
    ), "GenerationConfig._get_default_generation_params changed (tasks/generate.py)"
    prepare = TextGenerationPipeline._prepare_generate_kwargs
    assert list(inspect.signature(prepare).parameters)[:2] == ["self", "generate_kwargs"], (
        "TextGenerationPipeline._prepare_generate_kwargs changed (tasks/generate.py)"
    )


def test_the_recorded_generation_config_is_the_one_generate_uses(tiny_model: object) -> None:
    from tasks.generate import effective_generation
    from tasks.model import build_generator
    from tasks.settings import GenerationSettings

    settings = GenerationSettings(model=str(tiny_model), max_new_tokens=8, temperature=0.5)
    pipe = build_generator(settings).pipeline
    recorded = effective_generation(pipe, settings.pipeline_kwargs())
    # The pipeline samples by default (do_sample), the call's own values win, the rest are
    # generate()'s defaults.
    assert recorded["do_sample"] is True and recorded["temperature"] == 0.5
    assert recorded["max_new_tokens"] == 8 and recorded["num_beams"] == 1


def test_transformers_samples_as_batched_prompts_reproduce() -> None:
    from transformers.generation.utils import GenerationMixin

    assert callable(getattr(GenerationMixin, "_prepare_generation_config", None)), (
        "GenerationMixin._prepare_generation_config is gone (tasks/batching.py)"
    )
    source = inspect.getsource(GenerationMixin._get_logits_processor)
    order = [
        "TemperatureLogitsWarper",
        "TopHLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
    ]
    found = [source.find(f"{name}(") for name in order]
    assert -1 not in found and found == sorted(found), (
        "generate()'s sampling warpers changed (tasks/batching.py reproduces their order)"
    )
    merged = source.find("_merge_criteria_processor_list")
    assert 0 < merged < found[0], "custom logits processors no longer come before the warpers"
    sample = inspect.getsource(GenerationMixin._sample)
    assert "torch.multinomial(probs, num_samples=1)" in sample and "softmax" in sample, (
        "generate() samples differently (tasks/batching.py draws as it does)"
    )


def test_torch_has_the_packed_linear_operators() -> None:
    import torch

    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        assert hasattr(torch.ops.mkldnn, name), (
            f"torch.ops.mkldnn.{name} is gone: packed weights (tasks/packing.py) fall back to "
            "transformers' own layers"
        )


def test_uvicorn_keeps_its_open_connections() -> None:
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    server = uvicorn.Server(uvicorn.Config(app=lambda *a: None))
    assert isinstance(server.server_state.connections, set), (
        "uvicorn.Server.server_state.connections changed: the receiver's per-connection "
        "deadline (deployments/service/http.py) watches it"
    )
    assert "self.transport = transport" in inspect.getsource(H11Protocol.connection_made), (
        "uvicorn's connections no longer keep their transport: the receiver's deadline closes it"
    )


def test_prefects_event_client_caches_related_objects_as_the_warm_worker_fills_them() -> None:
    import prefect.events.related as related

    source = inspect.getsource(related._get_and_cache_related_object)
    assert isinstance(related.RESOURCE_CACHE, dict) and 'f"{kind}.{obj_id}"' in source, (
        "prefect.events.related no longer caches related objects under `kind.id` in "
        "RESOURCE_CACHE: a warm run's events read them again (deployments/service/worker.py)"
    )
    kinds = inspect.getsource(related.related_resources_from_run_context)
    for kind in ("flow", "deployment", "work-queue", "work-pool"):
        assert f'kind="{kind}"' in kinds, f"Prefect's events no longer relate a run's {kind}"
