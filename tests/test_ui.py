"""The routing page at /ui in a real headless browser (Debian's chromium driven by
selenium through the system chromedriver; nothing is downloaded at run time).
`make setup-system` installs the browser (README, "Tests")."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.test_server import Server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
UI = Path(__file__).resolve().parents[1] / "server" / "ui"
KEY = "ui-test-key"
MIXED = ("def total(prices):\n    return sum(prices)\n\n12 + 30 = 42\n7 * 6 = 42\n\n"
         "The licence grants permission to copy and distribute this software.\n\n"
         "#include <stdio.h>\nint main(void) { return 0; }\n")
PROMPT = "import os\n\ndef read_lines(path):\n    with open(path) as f:\n        return [line.rstrip() for line in f]\n"


def test_page_fetches_nothing_from_elsewhere():
    for f in UI.iterdir():
        text = f.read_text()
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), f"{f.name} loads something from elsewhere"
        assert "@import" not in text and "fetch(\"http" not in text, f.name


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}); run `make setup-system` "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,1280",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    # the system driver, explicitly: selenium must not look for (or download) one
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def test_routing_page_in_a_real_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    s = Server(["--api-key", KEY], tmp_path / "server.log").wait()  # the bundled demo, behind a key
    try:
        drv = browser
        wait = WebDriverWait(drv, 60)
        drv.get(s.url + "/ui")
        assert drv.title.startswith("emo-serve")
        # without the key the page says so instead of failing silently
        wait.until(lambda d: "API key" in d.find_element(By.ID, "status").text)
        key = drv.find_element(By.ID, "key")
        key.send_keys(KEY)
        drv.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#profile option")) >= 6)
        names = [o.get_attribute("value") for o in drv.find_elements(By.CSS_SELECTOR, "#profile option")]
        assert names == ["auto", "arith", "c", "prose", "python", "full"]
        rows = drv.find_elements(By.CSS_SELECTOR, "#profiles tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["arith", "c", "prose", "python", "full"]
        assert "MiB" in rows[0].text
        # analyse a Python prompt under the python profile
        box = drv.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(PROMPT)
        Select(drv.find_element(By.ID, "profile")).select_by_value("python")
        drv.find_element(By.ID, "analyse").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tokens .tok")) > 10)
        status = drv.find_element(By.ID, "status").text
        assert "leans to “python”" in status, status
        toks = drv.find_elements(By.CSS_SELECTOR, "#tokens .tok")
        shown = "".join(t.get_attribute("textContent") for t in toks)
        assert shown.replace("↵\n", "\n").replace("→", "\t") == PROMPT
        lean = drv.find_elements(By.CSS_SELECTOR, "#lean-bars .lean")
        assert lean[0].text.startswith("python")
        heat_rows = drv.find_elements(By.CSS_SELECTOR, "#heatmap .heat-row")
        assert len(heat_rows) == 1 + 4  # the expert-id header and 4 MoE layers
        cells = heat_rows[1].find_elements(By.CSS_SELECTOR, ".cell")
        assert len(cells) == 32 and len(heat_rows[1].find_elements(By.CSS_SELECTOR, ".cell.out")) == 32 - 8
        # hovering a token shows that token's experts only
        drv.execute_script("arguments[0].dispatchEvent(new Event('mouseenter'))", toks[3])
        assert "token 3" in drv.find_element(By.ID, "heat-title").text
        drv.execute_script("arguments[0].dispatchEvent(new Event('mouseleave'))", toks[3])
        # stream a completion under the chosen profile
        drv.find_element(By.ID, "max-tokens").clear()
        drv.find_element(By.ID, "max-tokens").send_keys("40")
        drv.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "completion").get_attribute("data-done") == "1")
        status = drv.find_element(By.ID, "status").text
        chunks = int(re.search(r"Streamed (\d+) chunks", status).group(1))
        assert chunks > 1, status
        assert drv.find_element(By.CSS_SELECTOR, "#completion .gen-text").text.strip()
        assert "profile “python”" in drv.find_element(By.ID, "served").text
        # the picture for people: a text of several domains, routed as "auto" picks, and its completion
        box.clear()
        box.send_keys(MIXED)
        Select(drv.find_element(By.ID, "profile")).select_by_value("auto")
        drv.find_element(By.ID, "analyse").click()
        wait.until(lambda d: "tokens routed" in d.find_element(By.ID, "status").text)
        colours = {t.value_of_css_property("background-color").rsplit(",", 1)[0]
                   for t in drv.find_elements(By.CSS_SELECTOR, "#tokens .tok")}
        assert len(colours) >= 3  # tokens lean to several profiles
        drv.find_element(By.ID, "max-tokens").clear()
        drv.find_element(By.ID, "max-tokens").send_keys("24")
        drv.find_element(By.ID, "generate").click()
        wait.until(lambda d: "Streamed" in d.find_element(By.ID, "status").text)
        shot = tmp_path / "ui-screenshot.png"
        drv.save_screenshot(str(shot))
        assert shot.stat().st_size > 20000
        print(f"\nscreenshot of the routing page: {shot}")
        if os.environ.get("EMO_UI_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["EMO_UI_SCREENSHOT"])
    finally:
        s.stop()


def test_structured_output_box_in_a_real_browser(browser, tmp_path):
    """The JSON-schema box: the answer under the chosen profile is JSON of the schema typed in the page; a schema
    the grammar library refuses shows the server's message naming the failing part."""
    import json

    import jsonschema
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    s = Server([], tmp_path / "server.log").wait()  # the bundled demo, with its chat template
    try:
        drv = browser
        wait = WebDriverWait(drv, 60)
        drv.get(s.url + "/ui")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#profile option")) >= 6)
        Select(drv.find_element(By.ID, "profile")).select_by_value("python")
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                   "tags": {"type": "array", "maxItems": 3,
                                                            "items": {"enum": ["io", "math", "text"]}}},
                  "required": ["name", "tags"], "additionalProperties": False}
        box = drv.find_element(By.ID, "schema")
        box.clear()
        box.send_keys(json.dumps(schema))
        drv.find_element(By.ID, "structured").click()
        wait.until(lambda d: d.find_element(By.ID, "structured-out").get_attribute("data-done"))
        out = drv.find_element(By.ID, "structured-out")
        assert out.get_attribute("data-done") == "1", drv.find_element(By.ID, "status").text
        jsonschema.validate(json.loads(out.text), schema)
        assert "profile “python”, stop" in drv.find_element(By.ID, "structured-served").text
        box.clear()
        box.send_keys(json.dumps({"type": "object", "properties": {"a": {"type": "strin"}}}))
        drv.find_element(By.ID, "structured").click()
        wait.until(lambda d: d.find_element(By.ID, "structured-out").get_attribute("data-done") == "error")
        assert "strin" in drv.find_element(By.ID, "status").text
    finally:
        s.stop()
