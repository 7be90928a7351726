import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ehi.cli import main
from ehi.server import create_app

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def model_dir(trained_tiny):
    return trained_tiny


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(model_dir), base_url="http://127.0.0.1") as c:
        yield c


def test_health_stats_and_page(client):
    assert client.get("/health").json() == {"status": "ok", "documents": 60, "leaves": 6}
    st = client.get("/stats").json()
    assert sum(st["leaf_sizes"]) == 60 and sum(st["leaf_size_histogram"]["counts"]) == 6
    assert st["config"]["tree"]["branching"] == 6
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "/search" in page.text


def test_search_single_and_batched(client, model_dir):
    r = client.post("/search", json={"query": "guitar chord melody music", "k": 3, "beam": 6})
    assert r.status_code == 200
    js = r.json()
    res = js["results"][0]
    assert len(res["hits"]) == 3 and res["hits"][0]["id"].startswith("music")
    assert res["fraction_visited"] == pytest.approx(1.0) and sorted(res["leaves"]) == list(range(6))
    # the service answers what the Python API answers
    from ehi.model.ehi_model import EHIModel

    direct = EHIModel.load(model_dir).search("guitar chord melody music", k=3, beam=6)[0]
    assert [h["id"] for h in res["hits"]] == [h.doc_id for h in direct.hits]
    assert [h["score"] for h in res["hits"]] == pytest.approx([h.score for h in direct.hits], abs=1e-5)
    r = client.post("/search", json={"query": ["oven flour bake", "stock market bond"], "k": 2, "budget": 0.5})
    res = r.json()["results"]
    assert [x["query"] for x in res] == ["oven flour bake", "stock market bond"]
    assert all(x["fraction_visited"] <= 0.5 + 1e-9 for x in res)


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"query": ""}, "query is empty"),
        ({"query": "   "}, "query is empty"),
        ({"query": "x" * 2001}, "longer than 2000"),
        ({"query": []}, "query list is empty"),
        ({"query": "a", "k": 0}, "greater than or equal to 1"),
        ({"query": "a", "k": 1001}, "less than or equal to 1000"),
        ({"query": "a", "budget": 0}, "greater than 0"),
        ({"query": "a", "budget": 1.5}, "less than or equal to 1"),
        ({"query": "a", "beam": 7}, "exceeds the tree's 6 leaves"),
        ({"query": "a", "beam": 2, "budget": 0.5}, "not both"),
        ({"query": "a", "colour": "red"}, "Extra inputs are not permitted"),
        ({}, "Field required"),
    ],
)
def test_validation_errors_are_4xx_with_a_message(client, body, fragment):
    r = client.post("/search", json=body)
    assert 400 <= r.status_code < 500
    assert fragment in r.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium and chromium-driver are not installed")
def test_page_in_headless_chromium(model_dir):
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model_dir), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # a bound for a broken server, not a timing assumption
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: "documents in 6 leaves" in d.find_element(By.ID, "meta").text)
        box = driver.find_element(By.ID, "q")
        box.send_keys("guitar chord melody music")
        driver.find_element(By.ID, "go").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "li.hit")))
        hits = driver.find_elements(By.CSS_SELECTOR, "li.hit")
        assert hits and "music" in hits[0].text
        assert "% of the corpus" in driver.find_element(By.ID, "visited").text
        assert driver.find_elements(By.CSS_SELECTOR, "#leafbar div.on")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "search_page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("raw", [
    '{"query": "a", "budget": NaN}', '{"query": "a", "budget": Infinity}', '{"query": "a", "k": NaN}',
    '{"query": "a", "k": -Infinity}', '{"query": "\\ud800"}', '{"query": ["ok", "\\udfff x"]}',
])
def test_non_finite_numbers_and_lone_surrogates_are_422(client, raw):
    r = client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def test_a_request_that_fails_in_a_batch_does_not_fail_the_others(model_dir):
    """The batcher runs a failing batch again item by item: only the bad item fails."""
    import asyncio

    from ehi.model.ehi_model import EHIModel
    from ehi.server import Batcher

    class Flaky(Batcher):
        def _search(self, batch):
            if any("boom" in t for item in batch for t in item.texts):
                raise RuntimeError("boom")
            return super()._search(batch)

    seen = []

    class Recording(Flaky):
        def _search(self, batch):
            seen.append(len(batch))
            return super()._search(batch)

    async def run():
        b = Recording(EHIModel.load(model_dir), max_batch=64, max_wait_ms=50)
        # all four are queued before the batcher runs: they always share one micro-batch
        jobs = [asyncio.ensure_future(b.submit([q], 3, 2)) for q in ["guitar chord", "boom", "oven flour", "stock bond"]]
        await asyncio.sleep(0)
        b.start()
        out = await asyncio.gather(*jobs, return_exceptions=True)
        await b.stop()
        return out

    out = asyncio.run(run())
    assert seen[0] == 4  # one batch of four failed, then each ran alone
    assert isinstance(out[1], RuntimeError)
    assert [len(json.loads(o[0])["hits"]) for i, o in enumerate(out) if i != 1] == [3, 3, 3]


def test_cli_api_and_server_share_one_default_width_and_result_shape(model_dir, tmp_path, capsys):
    """Without beam or budget, every entry point visits the default budget's leaves and
    returns the same result fields (one list entry per query, even for one string)."""
    from ehi.budget import DEFAULT_BUDGET
    from ehi.model.ehi_model import EHIModel

    model = EHIModel.load(model_dir)
    # a calibration under which the default budget means 3 leaves, not the narrowest search
    model.beam_calibration = [[b, 0.03 * b] for b in range(1, 7)]
    assert model.beam_for_budget(DEFAULT_BUDGET) == 3
    model.save(tmp_path / "m")
    q = "stock market bond"
    api = model.search(q, k=4)
    assert isinstance(api, list) and len(api) == 1 and len(api[0].leaves) == 3
    with TestClient(create_app(tmp_path / "m"), base_url="http://127.0.0.1") as c:
        server = c.post("/search", json={"query": q, "k": 4}).json()
    capsys.readouterr()
    assert main(["search", str(tmp_path / "m"), q, "-k", "4", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    want = api[0].to_dict()
    for got in (server["results"][0], cli[0]):
        assert {k: v for k, v in got.items() if k != "hits"} == {k: v for k, v in want.items() if k != "hits"}
        assert [(h["id"], h["title"]) for h in got["hits"]] == [(h["id"], h["title"]) for h in want["hits"]]
        assert [h["score"] for h in got["hits"]] == pytest.approx([h["score"] for h in want["hits"]], abs=1e-5)
    assert server["beam"] == len(api[0].leaves)


def test_a_filtered_request_returns_only_its_ids_and_unknown_ids_are_422(client):
    r = client.post("/search", json={"query": "guitar chord melody", "k": 5, "beam": 6, "ids": ["cooking-1", "music-2"]})
    assert r.status_code == 200
    assert {h["id"] for h in r.json()["results"][0]["hits"]} == {"cooking-1", "music-2"}
    r = client.post("/search", json={"query": "guitar", "ids": ["no-such-doc"]})
    assert r.status_code == 422 and "not indexed" in r.text


@pytest.mark.parametrize("body", [
    {"query": "a", "k": 0}, {"query": "a", "k": "many"}, {"query": ""}, {"query": []}, {"query": "a", "budget": 2},
    {"query": "a", "beam": 2, "budget": 0.5}, {"query": "a", "colour": "red"}, {}, {"query": "x" * 2001},
    {"query": "a", "ids": ["no-such-doc"]}, {"query": ["a"] * 65},
])
def test_every_4xx_is_one_sentence_without_the_input(client, body):
    r = client.post("/search", json=body)
    assert 400 <= r.status_code < 500, r.text
    detail = r.json()["detail"]
    assert set(r.json()) == {"detail"} and isinstance(detail, str) and "\n" not in detail
    assert not detail.startswith("Value error") and ", Value error" not in detail
    assert "x" * 50 not in detail and len(detail) < 300  # never the oversized query back


def test_a_body_without_json_content_type_is_told_so(client):
    r = client.post("/search", content=b'{"query": "guitar"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"] and "text/plain" in r.json()["detail"]
    r = client.post("/search", content=b'{"query": "guitar"}')
    assert r.status_code == 415 and "none was sent" in r.json()["detail"]
    r = client.post("/search", content=b'{"query": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json() == {"detail": "the body is not valid JSON"}


def test_a_filtered_request_finds_allowed_documents_outside_the_visited_leaves(client):
    # one leaf visited, two topics allowed: both come back, scored exactly
    r = client.post("/search", json={"query": "guitar chord melody", "k": 5, "beam": 1, "ids": ["cooking-1", "music-2"]})
    res = r.json()["results"][0]
    assert [h["id"] for h in res["hits"]] == ["music-2", "cooking-1"] and res["strategy"] == "exact" and res["visited"] == 2


def test_a_lone_request_never_waits_for_company_but_a_loaded_server_does(model_dir, monkeypatch):
    """The batcher waits for more requests only after a batch that held several."""
    import asyncio

    import ehi.server as server
    from ehi.model.ehi_model import EHIModel

    waits = []

    async def no_company(aw, timeout):  # records the wait; no request comes
        waits.append(timeout)
        aw.close()  # the queue.get() coroutine it would have awaited
        raise asyncio.TimeoutError

    monkeypatch.setattr(server.asyncio, "wait_for", no_company)

    async def run():
        b = server.Batcher(EHIModel.load(model_dir), max_wait_ms=10_000)
        b.start()
        await b.submit(["guitar chord"], 3, 2)  # alone after idle: no wait
        alone = len(waits)
        b.task.cancel()
        b = server.Batcher(b.model, max_wait_ms=10_000)
        jobs = [asyncio.ensure_future(b.submit([q], 3, 2)) for q in ["oven flour", "stock bond", "galaxy orbit"]]
        await asyncio.sleep(0)
        b.start()
        await asyncio.gather(*jobs)  # one batch of three: the server is loaded
        await b.submit(["guitar chord"], 3, 2)  # so the next batch waits for company
        await b.stop()
        return alone

    assert asyncio.run(run()) == 0
    assert len(waits) == 1 and waits[0] <= 10.0
