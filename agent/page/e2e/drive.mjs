// Drives the installer's page in headless Chromium (Debian's /usr/bin/chromium, through
// playwright-core) the way an installer would, for agent/tests/onboarding/page.rs, which starts
// the real iotd and fake-iot-core and checks the gateway's side. One scenario per run:
//
//   IOTD_PAGE_JOB='{"scenario": "...", "url": "...", ...}' node agent/page/e2e/drive.mjs
//
// The job: `url` (the page), `scenario`, `code` or `qr` (what is typed or pasted), `files` (the
// claim files chosen), `params` ({name: value}), `shots` (a directory for screenshots, each
// screen at 390×844 and 1280×800), `scan` (a QR text a stand-in BarcodeDetector finds: Chromium
// on Linux has none). Prints one JSON line: the last screen's name, title and text, and what
// the scenario saw on the way. Exits 1 with the reason when a screen does not come.

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const job = JSON.parse(process.env.IOTD_PAGE_JOB ?? '{}');
const PHONE = { width: 390, height: 844 };
const DESKTOP = { width: 1280, height: 800 };
// The gateway provisions in well under a second against fake-iot-core; PBKDF2 with 100 000
// iterations takes about a second in headless Chromium here.
const SCREEN_TIMEOUT = 60_000;

const browser = await chromium.launch({
  executablePath: job.chromium ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--use-fake-device-for-media-stream',
    '--use-fake-ui-for-media-stream',
  ],
});
const context = await browser.newContext({ viewport: PHONE, hasTouch: true, isMobile: true, deviceScaleFactor: 2 });
const page = await context.newPage();
const console_lines = [];
page.on('console', (m) => console_lines.push(`${m.type()}: ${m.text()}`));
page.on('pageerror', (e) => console_lines.push(`pageerror: ${e.message}`));
if (job.scan) {
  await context.grantPermissions(['camera']);
  // A stand-in for the Shape Detection API, which Chromium has on Android and macOS only: it
  // "sees" the label's QR text in the second frame it is shown.
  await page.addInitScript((text) => {
    let looks = 0;
    window.BarcodeDetector = class {
      constructor(options) {
        this.formats = options.formats;
      }
      async detect() {
        looks += 1;
        return looks < 2 ? [] : [{ rawValue: text, format: 'qr_code' }];
      }
    };
  }, job.scan);
}

// The problem screen's buttons that were disabled (held), as they happen: a held button is
// enabled again a second later, sooner than a look at the screen may come on a busy machine.
await page.addInitScript(() => {
  window.heldButtons = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.disabled && r.target.closest('#problem-actions')) window.heldButtons.push(r.target.textContent);
    }
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ['disabled'] });
});

const seen = [];

async function shot(name) {
  if (!job.shots) return;
  mkdirSync(job.shots, { recursive: true });
  name = `${job.prefix ?? ''}${name}`;
  await page.screenshot({ path: `${job.shots}/${name}-390x844.png`, fullPage: true });
  await page.setViewportSize(DESKTOP);
  await page.screenshot({ path: `${job.shots}/${name}-1280x800.png`, fullPage: true });
  await page.setViewportSize(PHONE);
}

/** Waits for `screen` (the body's data-screen); returns its title and text. */
async function screen(name, timeout = SCREEN_TIMEOUT) {
  await page.waitForSelector(`body[data-screen="${name}"]`, { timeout });
  return state();
}

async function state() {
  return page.evaluate(() => {
    const screen = document.body.dataset.screen;
    const section = document.getElementById(screen);
    return {
      screen,
      title: document.getElementById('title').textContent,
      text: section ? section.innerText : '',
      focused: document.activeElement?.id ?? null,
    };
  });
}

/** The problem screen with `title`, or the reason it did not come. */
async function problem(title, timeout = SCREEN_TIMEOUT) {
  const found = await screen('problem', timeout);
  if (found.title !== title) throw new Error(`expected the problem screen “${title}”, got ${JSON.stringify(found)}`);
  return found;
}

/**
 * Sends malformed pairing requests until the gateway answers 429: each takes a token from its
 * one rate-limit bucket before the body is read, and none starts a session.
 */
async function emptyTheBucket() {
  for (let i = 0; i < 50; i++) {
    const response = await fetch(new URL('/v1/pair/params', job.url), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: '{}',
    });
    await response.arrayBuffer();
    if (response.status === 429) return;
  }
  throw new Error('the gateway did not rate-limit 50 pairing requests');
}

async function fillForm({ code, qr, files, params }) {
  const input = page.locator('#code');
  if (qr || code) await input.fill('');
  if (qr) {
    await input.fill(qr);
  } else if (code) {
    // Typed as on a phone's keypad, digit by digit: the page groups them as the label does.
    await input.pressSequentially(code.replace(/-/g, ''), { delay: 5 });
  }
  if (files) await page.setInputFiles('#claim', files);
  for (const [name, value] of Object.entries(params ?? {})) {
    await page.getByLabel(name, { exact: true }).fill(value);
  }
}

async function start() {
  await page.getByRole('button', { name: 'Set up gateway' }).click();
}

const scenarios = {
  // A full onboarding: the QR text pasted (or scanned), the claim file(s), the parameters,
  // live progress, the thing name.
  async onboard() {
    await page.goto(job.url);
    await screen('form');
    await shot('1-form');
    if (job.scan) {
      await page.getByRole('button', { name: 'Scan the label’s QR code' }).click();
      await page.waitForFunction(() => document.getElementById('code').value.length === 19);
    }
    await fillForm(job.scan ? { files: job.files, params: job.params } : job);
    // The narrowest phones: nothing may need sideways scrolling at 320 px.
    await page.setViewportSize({ width: 320, height: 700 });
    const width320 = await page.evaluate(() => document.documentElement.scrollWidth);
    await page.setViewportSize(PHONE);
    seen.push({
      code_state: await page.locator('#code-state').innerText(),
      claim_state: await page.locator('#claim-state').innerText(),
      code: await page.locator('#code').inputValue(),
      width320,
    });
    await shot('2-form-filled');
    // The hand-over is held until the progress screen is photographed: against the fake the
    // whole onboarding takes less than a second.
    let release;
    const held = new Promise((resolve) => (release = resolve));
    await page.route('**/v1/claim', async (route) => {
      await held;
      if (job.loseClaimAnswer) {
        // The claim reaches the gateway, its answer never reaches the page (a Wi-Fi drop):
        // the page must follow the gateway's events to the end all the same.
        await route.fetch();
        await route.abort('connectionreset');
        return;
      }
      await route.continue();
    });
    await start();
    await page.waitForSelector('#steps li[data-step="hand-over"].doing');
    await shot('3-progress');
    release();
    const done = await screen('done');
    await shot('4-done');
    done.thing = await page.locator('#thing-name').innerText();
    return done;
  },

  // Wrong codes until the gateway's window closes at its cap; the attempts left as shown. The
  // gateway allows 10 pairings, then one a second: on a fast machine the tries outrun it, and
  // its "Too many requests" screen holds "Try again" until the gateway's Retry-After has passed
  // (the click waits for the button). So that every machine sees that screen, the driver
  // empties the gateway's bucket before each try until the page has shown it once. At most 40
  // refusals of the code, and as many of the rate.
  async wrongCodes() {
    await page.goto(job.url);
    await screen('form');
    let codes = 0;
    let rates = 0;
    for (let first = true; codes < 40 && rates < 40; first = false) {
      await fillForm({ code: job.code, files: first ? job.files : null, params: first ? job.params : null });
      if (rates === 0) await emptyTheBucket();
      await start();
      const found = await screen('problem');
      const held = await page.evaluate(() => window.heldButtons.splice(0).length > 0);
      seen.push({ title: found.title, text: found.text, held });
      if (found.title === 'Setup is locked') {
        await shot('7-locked');
        return found;
      }
      if (found.title === 'Too many requests') {
        rates += 1;
      } else {
        if (codes === 0) await shot('6-wrong-code');
        codes += 1;
      }
      await page.locator('#problem-actions button').first().click({ timeout: SCREEN_TIMEOUT });
      await screen('form');
    }
    throw new Error(`the window did not close after ${codes} wrong codes: ${JSON.stringify(seen)}`);
  },

  // Everything right, and the gateway's provisioning fails afterwards (an expired claim).
  async failsOnline() {
    await page.goto(job.url);
    await screen('form');
    await fillForm(job);
    await start();
    const found = await problem(job.expect);
    await shot(job.shot);
    return found;
  },

  // The claim is refused by the gateway itself (its key is not the certificate's).
  async claimRefused() {
    await page.goto(job.url);
    await screen('form');
    await fillForm(job);
    await start();
    const found = await problem('The gateway refused the claim');
    await shot('9-claim-refused');
    return found;
  },

  // The page as it opens: a problem screen (window closed) or the form (to read it). With
  // `retry`, a refused connection is tried again for up to 20 s: the interface the page is
  // served on was just made, and iotd binds it when the kernel reports the new link.
  async opens() {
    const deadline = Date.now() + (job.retry ? 20_000 : 0);
    for (;;) {
      try {
        await page.goto(job.url, { timeout: 15_000 });
        break;
      } catch (e) {
        if (Date.now() > deadline || !/ERR_CONNECTION_REFUSED/.test(e.message)) throw e;
        seen.push({ refused: Date.now() });
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    const found = await page.waitForSelector('body[data-screen="problem"], body[data-screen="form"], body[data-screen="done"]').then(state);
    if (job.shot) await shot(job.shot);
    found.warning = await page.locator('#shared-warning').isVisible();
    return found;
  },

  // A page that must not load: the error Chromium gives.
  async refused() {
    try {
      await page.goto(job.url, { timeout: 15_000 });
    } catch (e) {
      return { screen: null, error: e.message.split('\n')[0] };
    }
    return { screen: 'loaded', text: await page.content() };
  },
};

try {
  const run = scenarios[job.scenario];
  if (!run) throw new Error(`no scenario ${job.scenario}`);
  const result = await run();
  console.log(JSON.stringify({ ...result, seen, console: console_lines }));
} catch (e) {
  const last = await state().catch(() => null);
  if (job.shots) await shot(`failed-${job.scenario}`).catch(() => {});
  console.log(JSON.stringify({ failed: e.message, last, seen, console: console_lines }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
