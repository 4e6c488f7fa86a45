// Drives the gateway's playground page in Debian's headless Chromium: a prompt to an image, then
// an uploaded image to a caption. Usage: node playground.mjs URL TOKEN SCREENSHOT.png IMAGE.png
// Prints "queued" once the first job is queued (the test starts the worker then, so that the
// progress bar must follow every step from the event stream). With RESTART set, the test restarts
// the gateway then: the page prints "reconnecting" when its stream ends and "queued again" when it
// follows the job on the new gateway.
import { chromium } from "playwright-core";

const [url, token, screenshot, image] = process.argv.slice(2);
if (!url || !token || !screenshot || !image) {
  console.error("usage: node playground.mjs URL TOKEN SCREENSHOT.png IMAGE.png");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 1000 } });
  page.on("console", (m) => console.log(`page: ${m.text()}`));
  await page.goto(url);
  await page.fill("#token", token);
  await page.dispatchEvent("#token", "change");

  await page.selectOption("#task", "generate");
  await page.fill("#prompt", process.env.PROMPT || "a red circle left of a blue square");
  await page.fill("#steps", process.env.STEPS || "12");
  await page.click("#run");
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("queued"));
  console.log("queued");
  if (process.env.RESTART) {
    const status = (prefix) => page.waitForFunction(
      (p) => document.getElementById("status").textContent.startsWith(p), prefix, { timeout: 30000 });
    await status("reconnecting");
    console.log("reconnecting");
    await status("queued");
    console.log("queued again");
  }
  await page.waitForSelector("body[data-done]", { timeout: 120000 });
  const done = await page.getAttribute("body", "data-done");
  const status = await page.textContent("#status");
  if (done !== "succeeded") throw new Error(`generate ended ${done}: ${status}`);
  const size = await page.$eval("#picture", (img) => [img.naturalWidth, img.naturalHeight]);
  if (!(size[0] > 0 && size[1] > 0)) throw new Error(`no image shown: ${size}`);
  const bar = await page.$eval("#bar", (b) => [b.value, b.max]);
  const steps = Number(process.env.STEPS || 12);
  if (bar[0] !== steps || bar[1] !== steps) throw new Error(`progress bar at ${bar[0]} of ${bar[1]}`);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`generate: ${status}; image ${size[0]}x${size[1]}; screenshot ${screenshot}`);

  await page.selectOption("#task", "caption");
  await page.setInputFiles("#image", image);
  await page.fill("#steps", "6");
  await page.click("#run");
  await page.waitForSelector("body[data-done]", { timeout: 120000 });
  const caption = await page.textContent("#text");
  if ((await page.getAttribute("body", "data-done")) !== "succeeded" || !caption) {
    throw new Error(`caption failed: ${await page.textContent("#status")}`);
  }
  console.log(`caption: "${caption}"`);
} finally {
  await browser.close();
}
