"""Prometheus text exposition of the server's counters and the engine's live state."""

from __future__ import annotations

from ktrans_server.service import Service

_COUNTERS = [
    ("requests_started", "ktrans_requests_total", "Generation requests admitted"),
    ("requests_rejected", "ktrans_requests_rejected_total", "Requests refused because the queue was full"),
    ("requests_aborted", "ktrans_requests_aborted_total", "Requests aborted before finishing (client gone, error)"),
    ("prompt_tokens", "ktrans_prompt_tokens_total", "Prompt tokens processed"),
    ("generation_tokens", "ktrans_generation_tokens_total", "Tokens generated"),
    ("ttft_seconds_sum", "ktrans_time_to_first_token_seconds_sum", "Sum of time to first token"),
    ("ttft_count", "ktrans_time_to_first_token_seconds_count", "Requests with a first token"),
]

_GAUGES = [
    ("waiting", "ktrans_requests_waiting", "Requests queued for admission"),
    ("running", "ktrans_requests_running", "Requests in the running batch"),
    ("kv_pages_used", "ktrans_kv_pages_used", "KV cache pages in use"),
    ("kv_pages_total", "ktrans_kv_pages_total", "KV cache pages in the pool"),
    ("steps", "ktrans_engine_steps_total", "Engine steps executed"),
    ("last_step_seconds", "ktrans_engine_step_seconds", "Duration of the last engine step"),
]


def render(service: Service) -> str:
    lines = []
    for key, name, help_ in _COUNTERS:
        kind = "counter" if not name.endswith(("_sum", "_count")) else "untyped"
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {service.counters.get(key, 0.0):g}"]
    statuses = sorted(k for k in service.counters if k.startswith("responses_"))
    lines += ["# HELP ktrans_http_responses_total HTTP responses by status",
              "# TYPE ktrans_http_responses_total counter"]
    lines += [f'ktrans_http_responses_total{{status="{k[10:]}"}} {service.counters[k]:g}' for k in statuses]
    lines += ["# HELP ktrans_ready 1 once the model is loaded", "# TYPE ktrans_ready gauge",
              f"ktrans_ready {1 if service.ready else 0}"]
    stats = service.engine.stats() if service.ready else {}
    for key, name, help_ in _GAUGES:
        if key in stats:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {float(stats[key]):g}"]
    return "\n".join(lines) + "\n"
