"""The MLflow UI in headless Chromium: two versions, their commits, their generation tables.

Needs Debian's chromium (/usr/bin/chromium, or $CHROMIUM); CI installs it. Screenshots are
written to $TEXTGEN_SCREENSHOTS (CI keeps them in build/screenshots), else a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient

from deployments.cli import main
from flows.text_generation import nlp_text_generation
from tests.conftest import GitRepo, RepoFactory, settings_yaml
from tests.servers import PrefectServer, Service, free_port, start_serve, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("prefect_harness")]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def screenshots(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where a test's screenshots go: $TEXTGEN_SCREENSHOTS/name, else a temporary folder."""
    root = os.environ.get("TEXTGEN_SCREENSHOTS")
    if root:
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path_factory.mktemp(name)


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), (
        f"{CHROMIUM} not found: apt-get install chromium (or set CHROMIUM)"
    )
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def two_versions(make_repo: RepoFactory, tiny_model: Path) -> dict[str, Any]:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model, random_seed=1)}, "seed 1")
    first = nlp_text_generation(repo_url=str(repo.path))
    repo.commit({"textgen.yaml": settings_yaml(tiny_model, random_seed=2)}, "seed 2")
    second = nlp_text_generation(repo_url=str(repo.path))
    assert (first.version, second.version) == (1, 2)
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    texts = {}
    for record in (first, second):
        table = json.loads(
            Path(client.download_artifacts(record.run_id, "generations.json")).read_text()
        )
        texts[record.version] = [
            row[table["columns"].index("generated_text")] for row in table["data"]
        ]
    return {"repo": repo, "records": (first, second), "texts": texts}


@pytest.fixture
def mlflow_ui(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    service = Service.textgen(["ui", "--port", str(port)], dict(os.environ), tmp_path / "ui.log")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(lambda: up() or not service.alive(), 90, "the MLflow UI to answer")
        assert service.alive(), service.output()
        yield url
    finally:
        service.stop()


def test_the_runs_page_and_the_artifact_view_show_both_versions(
    browser: Any,
    two_versions: dict[str, Any],
    mlflow_ui: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    shots = screenshots(tmp_path_factory, "runs-page")
    first, second = two_versions["records"]
    page = browser.new_page(viewport={"width": 1800, "height": 1000})
    page.goto(f"{mlflow_ui}/#/experiments/{first.experiment_id}/runs?workflowType=machine_learning")
    try:
        for record in (first, second):
            page.get_by_text(f"v{record.version} {record.commit_sha[:7]}").first.wait_for(
                timeout=30000
            )
        page.get_by_role("button", name="Columns").click()
        page.get_by_title("Version", exact=True).click()  # a node of the column picker's tree
        page.keyboard.press("Escape")
        header = page.get_by_role("columnheader", name="Version").first
        header.wait_for(timeout=10000)
        page.screenshot(path=str(shots / "runs.png"))
        # The grid renders pinned and scrolling cells in separate rows, joined by row-index.
        cells = page.locator("[role=gridcell]")
        by_row: dict[str, dict[str, str]] = {}
        for index in range(cells.count()):
            cell = cells.nth(index)
            row = cell.evaluate("e => e.closest('[role=row]').getAttribute('row-index')")
            by_row.setdefault(row, {})[cell.get_attribute("col-id") or ""] = cell.inner_text()
        versions = {
            cells_of_row["attributes.`Run Name`"].split()[-2]: cells_of_row["attributes.`Version`"]
            for cells_of_row in by_row.values()
        }
        assert set(versions) == {"v1", "v2"}
        for record in (first, second):
            shown = versions[f"v{record.version}"].strip()
            assert len(shown) >= 6 and record.commit_sha.startswith(shown), (
                shown,
                record.commit_sha,
            )

        page.goto(
            f"{mlflow_ui}/#/experiments/{first.experiment_id}/runs"
            "?workflowType=machine_learning&compareRunsMode=ARTIFACT"
        )
        page.get_by_text("generations.json").first.wait_for(timeout=30000)
        page.get_by_text(two_versions["texts"][2][0][:40]).first.wait_for(timeout=30000)
        page.screenshot(path=str(shots / "artifact-view.png"), full_page=True)
        body = page.inner_text("body")
        assert "Compare: generated_text" in " ".join(body.split())
        for version in (1, 2):
            record = (first, second)[version - 1]
            assert f"v{version} {record.commit_sha[:7]}" in body
            for text in two_versions["texts"][version][:2]:
                assert text.strip()[:40] in body, f"v{version}'s text is not shown"
    except Exception:
        page.screenshot(path=str(shots / "failure.png"), full_page=True)
        print(f"screenshots in {shots}")
        raise


def test_the_html_report_renders(
    browser: Any, two_versions: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "compare.html"
    repo = two_versions["repo"]
    assert (
        main(["compare", "1", "2", "--repo", str(repo.path), "--html", str(report), "--no-color"])
        == 0
    )
    out = capsys.readouterr().out
    assert "random_seed  1   2" in out
    assert "seed 2" in out  # the commit between them
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(report.as_uri())
    assert page.locator("h1").inner_text() == "v1 vs v2"
    assert page.locator("del").count() > 0 and page.locator("ins").count() > 0
    assert page.locator("h3").count() == 5
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
    assert requests == [report.as_uri()], "the page loads nothing else"


def _links(text: str) -> list[str]:
    return [url.rstrip(").,") for url in re.findall(r"https?://[^\s<>\"']+", text)]


def test_every_link_printed_after_serve_and_a_push_opens(
    browser: Any,
    tmp_path: Path,
    tiny_model: Path,
    shared_model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`textgen serve` with its MLflow UI, one push; then every link `textgen status` and
    `textgen run` print, and those serve logs, open in the browser, and the version's links show
    its output.txt."""
    shots = screenshots(tmp_path_factory, "serve-links")
    work = GitRepo(tmp_path / "work")
    spec = "on:\n  github:\n    branches:\n      only: main\n"
    work.commit(
        {
            "textgen.yaml": settings_yaml(tiny_model, random_seed=5),
            ".gradient/workflows/run.yaml": spec,
        },
        "seed 5",
    )
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work.path), str(bare)], check=True)
    work.git("remote", "add", "origin", str(bare))
    ui_port = free_port()
    prefect = PrefectServer(tmp_path / "prefect")
    prefect.start()
    try:
        service, _, tracking_uri = start_serve(
            tmp_path, bare, prefect, "s3cret", str(shared_model_cache), ui_port=ui_port
        )
    except BaseException:
        prefect.stop()
        raise
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect.api_url,
        "TEXTGEN_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TEXTGEN_ARTIFACT_ROOT": (tmp_path / "artifacts").as_uri(),
        "TEXTGEN_MLFLOW_UI_URL": f"http://127.0.0.1:{ui_port}",
    }

    def textgen(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "deployments.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (done.stdout, done.stderr, service.output()[-3000:])
        return done.stdout

    try:
        work.commit({"textgen.yaml": settings_yaml(tiny_model, random_seed=6)}, "seed 6")
        work.git("push", "--quiet", "origin", "HEAD:main")
        sha = work.git("rev-parse", "HEAD")
        textgen("status", "--wait", "--timeout", "300")
        printed = textgen("status") + textgen("run", "--repo", str(bare))
        serve_log = service.output()
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.search_experiments()[0]
        version = client.search_runs([experiment.experiment_id], "tags.`textgen.outcome` = 'new'")[
            0
        ]
        assert version.data.tags["mlflow.source.git.commit"] == sha
        output = Path(client.download_artifacts(version.info.run_id, "output.txt")).read_text()
        first_text = output.split("---", 3)[-1].strip().splitlines()[0][:40]

        links = sorted(set(_links(printed)))
        ui_line = next(line for line in serve_log.splitlines() if "MLflow UI on" in line)
        links += _links(ui_line)
        # status's last version and run's output.txt both lead to the version's run.
        assert any(version.info.run_id in u for u in links), printed
        assert any("/artifactPath/output.txt" in u for u in links), printed
        reused = [u for u in links if "/runs/" in u and version.info.run_id not in u]
        assert len(reused) == 1, printed  # the run's own record, which reused it
        assert any(f"127.0.0.1:{ui_port}" in u for u in links)
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{ui_port}/health", timeout=2).status_code == 200,
            120,
            "serve's MLflow UI",
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        for index, url in enumerate(links):
            if "/webhooks/" in url:
                # The receiver's endpoints take POSTed deliveries; a GET is refused, not lost.
                assert httpx.get(url, timeout=5).status_code in {404, 405}
                continue
            response = page.goto(url)
            assert response is None or response.ok, (url, response and response.status)
            if "/artifactPath/output.txt" in url:  # the file itself, open in the UI
                assert version.info.run_id in url
                page.get_by_text(first_text).first.wait_for(timeout=30000)
            elif version.info.run_id in url:
                page.get_by_text(f"v1 {sha[:7]}").first.wait_for(timeout=30000)
                page.get_by_role("tab", name="Artifacts").click()
                page.get_by_text("output.txt").first.click()
                page.get_by_text(first_text).first.wait_for(timeout=30000)
            elif url in reused:
                page.get_by_text(f"{sha[:7]} reuses v1").first.wait_for(timeout=30000)
            page.screenshot(path=str(shots / f"link-{index}.png"), full_page=True)
    except Exception:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
        print(f"screenshots in {shots}")
        raise
    finally:
        service.stop()
        prefect.stop()


def test_an_evaluation_set_is_at_home_on_the_genai_side(
    browser: Any,
    make_repo: RepoFactory,
    tiny_model: Path,
    mlflow_ui: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    shots = screenshots(tmp_path_factory, "genai")
    prompts = ["Hello, I'm a language model,", "Once upon a time"]
    values = {"prompts": prompts, "matrix": {"random_seed": [42, 7]}, "max_new_tokens": 8}
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model, **values)}, "two prompts")
    first = nlp_text_generation(repo_url=str(repo.path))
    values["prompts"] = [*prompts, "The weather today"]
    repo.commit({"textgen.yaml": settings_yaml(tiny_model, **values)}, "one more prompt")
    second = nlp_text_generation(repo_url=str(repo.path))
    experiment = f"{mlflow_ui}/#/experiments/{first.experiment_id}"
    page = browser.new_page(viewport={"width": 1800, "height": 1100})
    try:
        page.goto(f"{experiment}/traces")
        page.get_by_text("Once upon a time").first.wait_for(timeout=30000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "traces.png"))
        body = page.inner_text("body")
        for name in ("distinct_2", "perplexity"):
            assert name in body, f"the traces table has no {name} column"
        # Each version is a session (MLflow 3.17 shows sessions as a column of the traces).
        assert {"v1", "v2"} <= set(body.split()), "the traces name no session per version"

        page.goto(f"{experiment}/evaluation-runs")
        page.get_by_text("evaluation v2").first.wait_for(timeout=30000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "evaluation-runs.png"))
        assert "evaluation v1" in page.inner_text("body")

        # The overview's panels count the traces, their tokens and their assessments.
        expected = {
            "usage": ["Traces\n10", "Token Usage", "240 output"],
            "quality": ["Quality Summary", "distinct_2", "repetition_rate"],
        }
        for tab, words in expected.items():
            page.goto(f"{experiment}/overview/{tab}")
            page.get_by_text(words[1]).first.wait_for(timeout=30000)
            if (got_it := page.get_by_text("Got it", exact=True)).count():
                got_it.first.click()
            page.wait_for_timeout(3000)
            page.screenshot(path=str(shots / f"overview-{tab}.png"), full_page=True)
            body = page.inner_text("body")
            for word in words:
                assert word in body, f"the overview's {tab} tab shows no {word!r}"

        page.goto(f"{experiment}/runs?workflowType=machine_learning")
        page.get_by_text(f"v{second.version} {second.commit_sha[:7]}").first.wait_for(timeout=30000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "runs.png"))
    except Exception:
        page.screenshot(path=str(shots / "failure.png"), full_page=True)
        print(f"screenshots in {shots}")
        raise
    print(f"screenshots in {shots}")
