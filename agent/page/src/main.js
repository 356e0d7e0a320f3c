// The installer's page: the setup code, the claim, the installer's parameters; then pairing
// (SPAKE2+ as the prover, binding "none"), the sealed hand-over, and the gateway's progress from
// its event stream. Every refusal becomes a screen that says what went wrong and what to do.

import {
  ProtocolError,
  appKeys,
  clientRandom,
  codeState,
  context,
  deriveSecret,
  formatCode,
  fromB64,
  open,
  parseQr,
  proverStart,
  seal,
  toB64,
  QR_PREFIX,
} from './protocol.js';
import { ClaimError, readClaim } from './claim.js';

/* global CLIENT_VERSION */
const CLIENT_ID = `web/${CLIENT_VERSION}`;
const MAX_BUNDLE = 12288;
const $ = (id) => document.getElementById(id);
const utf8 = new TextEncoder();

const state = {
  serial: null,
  parameters: [],
  view: null,
  busy: false,
  // The serial of a QR payload the installer pasted or scanned: it must be the gateway's.
  qrSerial: null,
  files: [],
};

// ---------------------------------------------------------------------------------------------
// Screens.

const TITLES = {
  loading: 'Set up this gateway',
  form: 'Set up this gateway',
  progress: 'Setting up the gateway…',
  done: 'Gateway set up',
};

function show(screen, title) {
  for (const section of document.querySelectorAll('main > section')) {
    section.hidden = section.id !== screen;
  }
  const heading = $('title');
  heading.textContent = title ?? TITLES[screen];
  document.title = heading.textContent;
  document.body.dataset.screen = screen;
  // Screen readers hear the new screen; keyboard focus starts at its top.
  heading.focus();
  window.scrollTo(0, 0);
}

/**
 * An error screen: `title` (what happened), `cause` (the gateway's or the page's sentence),
 * `next` (steps for the installer), `actions` ([label, handler]).
 */
function problem({ title, cause, detail = '', next = [], actions = [] }) {
  state.busy = false;
  $('problem-cause').textContent = cause;
  $('problem-detail').textContent = detail;
  $('problem-detail').hidden = !detail;
  const list = $('problem-next');
  list.replaceChildren(
    ...next.map((text) => {
      const li = document.createElement('li');
      li.textContent = text;
      return li;
    }),
  );
  const row = $('problem-actions');
  row.replaceChildren(
    ...actions.map(([label, handler], i) => {
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = label;
      if (i === 0) button.className = 'primary';
      button.addEventListener('click', handler);
      return button;
    }),
  );
  show('problem', title);
}

/**
 * Disables the problem screen's first button for `seconds`, counting down on it; it is enabled
 * again when the time is up (unless another screen replaced it).
 */
function holdFirstAction(seconds) {
  const button = $('problem-actions').querySelector('button');
  const label = button.textContent;
  // The monotonic clock: a wall clock set back would hold the button for as long.
  const until = performance.now() + seconds * 1000;
  button.disabled = true;
  const tick = () => {
    if (!button.isConnected) return;
    const left = Math.ceil((until - performance.now()) / 1000);
    if (left <= 0) {
      button.disabled = false;
      button.textContent = label;
      return;
    }
    button.textContent = `${label} (${left} s)`;
    // Wakes when the shown number changes, not more often.
    setTimeout(tick, until - performance.now() - (left - 1) * 1000);
  };
  tick();
}

const backToForm = (focus) => () => {
  show('form');
  if (focus) $(focus).focus();
};
const reload = () => window.location.reload();

/** Back to the form with the claim files cleared, for a new or corrected claim. */
function chooseClaimAgain() {
  $('claim').value = '';
  state.files = [];
  renderClaim();
  backToForm('claim')();
}

// ---------------------------------------------------------------------------------------------
// The gateway's API.

class Refused extends Error {
  constructor(status, body, retryAfter = null) {
    super(body?.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.error ?? 'unknown';
    this.attemptsLeft = body?.attempts_left;
    // Whole seconds (a 429's Retry-After), or null.
    this.retryAfter = retryAfter;
  }
}

/** A `Retry-After` in seconds (the gateway sends whole seconds), at most 5 minutes. */
function retryAfter(response) {
  const seconds = Number(response.headers.get('retry-after') ?? NaN);
  return Number.isInteger(seconds) && seconds > 0 ? Math.min(seconds, 300) : null;
}

class Unreachable extends Error {}

async function call(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: body ? { 'content-type': 'application/json' } : {},
      body: body ? JSON.stringify(body) : undefined,
      cache: 'no-store',
    });
  } catch {
    throw new Unreachable(`the gateway did not answer (${path})`);
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    answer = null;
  }
  if (!response.ok) throw new Refused(response.status, answer, retryAfter(response));
  if (answer === null) throw new ProtocolError('protocol', `the gateway’s answer to ${path} is not JSON`);
  return answer;
}

const post = (path, body) => call('POST', path, { v: 1, ...body });

// ---------------------------------------------------------------------------------------------
// The window and progress, from /v1/events.

function minutes(seconds) {
  if (seconds < 60) return `${seconds} s`;
  return `${Math.ceil(seconds / 60)} min`;
}

function renderWindow() {
  const view = state.view;
  const line = $('window-line');
  if (!view) return;
  const strong = document.createElement('b');
  strong.textContent = view.window === 'open' ? 'open' : 'closed';
  let rest = '';
  if (view.window === 'open') {
    const tries = `${view.attempts_left} ${view.attempts_left === 1 ? 'try' : 'tries'} left`;
    rest = view.closes_in > 0 ? `: ${tries}, closes in ${minutes(view.closes_in)}.` : `: ${tries}.`;
  } else {
    rest = '.';
  }
  line.replaceChildren('Setup is ', strong, rest);
}

const PHASES = ['paired', 'claim-received', 'connecting-with-claim', 'certificate-issued', 'thing-registered', 'connected'];
const STEP_OF_PHASE = {
  paired: 'hand-over',
  'claim-received': 'connecting-with-claim',
  'connecting-with-claim': 'connecting-with-claim',
  'certificate-issued': 'thing-registered',
  'thing-registered': 'connected',
  connected: null,
};

/** Steps before `current` done, `current` under way (or failed); null: all done. */
function markSteps(current, failed = false) {
  const items = [...document.querySelectorAll('#steps li')];
  const index = current === null ? items.length : items.findIndex((li) => li.dataset.step === current);
  items.forEach((li, i) => {
    li.className = i < index ? 'done' : i === index ? (failed ? 'failed' : 'doing') : '';
  });
  const now = items[index]?.querySelector('span:last-child');
  $('live').textContent = now ? now.textContent : '';
}

let stalledTimer = null;

function onView(view) {
  state.view = view;
  renderWindow();
  if (!state.following) return;
  if (view.phase === 'connected') {
    state.following = false;
    clearTimeout(stalledTimer);
    markSteps(null);
    $('thing-name').textContent = view.thing_name ?? '';
    show('done');
    return;
  }
  if (view.phase === 'failed') {
    state.following = false;
    clearTimeout(stalledTimer);
    failedOnline(view.error ?? { code: 'unknown', message: 'The gateway did not say why.' });
    return;
  }
  if (PHASES.includes(view.phase) && view.phase !== 'paired') {
    markSteps(STEP_OF_PHASE[view.phase]);
    clearTimeout(stalledTimer);
    $('progress-hint').textContent = '';
    stalledTimer = setTimeout(() => {
      $('progress-hint').textContent =
        'This is taking longer than usual. The gateway keeps trying; check that it has an internet connection.';
    }, 60000);
  }
}

function watchEvents() {
  const source = new EventSource('/v1/events');
  source.onmessage = (event) => {
    try {
      onView(JSON.parse(event.data));
    } catch {
      // A damaged event changes nothing; the next one carries the whole state again.
    }
  };
  source.onerror = () => {
    // EventSource reconnects by itself; while following, say so.
    if (state.following) $('progress-hint').textContent = 'Lost contact with the gateway; reconnecting…';
  };
  source.onopen = () => {
    if (state.following) $('progress-hint').textContent = '';
  };
}

// ---------------------------------------------------------------------------------------------
// The form.

function renderCode() {
  const input = $('code');
  const text = input.value;
  const out = $('code-state');
  out.className = 'hint';
  if (text.trim().toUpperCase().startsWith(QR_PREFIX)) {
    try {
      const { serial, digits } = parseQr(text);
      state.qrSerial = serial;
      input.value = formatCode(digits);
      out.className = 'field-ok';
      out.textContent = `QR code read: gateway ${serial}.`;
      input.setAttribute('aria-invalid', 'false');
      return true;
    } catch (e) {
      out.className = 'field-bad';
      out.textContent = e.message;
      input.setAttribute('aria-invalid', 'true');
      return false;
    }
  }
  const code = codeState(text);
  if (code.problem) {
    out.className = 'field-bad';
    out.textContent = code.problem;
    input.setAttribute('aria-invalid', 'true');
    return false;
  }
  input.setAttribute('aria-invalid', 'false');
  if (code.complete) {
    out.className = 'field-ok';
    out.textContent = 'Code complete; its check digit is right.';
    return true;
  }
  out.textContent = code.digits.length ? `${code.digits.length} of 16 digits` : '';
  return false;
}

function onCodeInput(event) {
  const input = $('code');
  state.qrSerial = null;
  // Group the digits as on the label while typing, keeping the caret at the end.
  if (event.inputType?.startsWith('insert') && /^[\d\s-]*$/.test(input.value)) {
    const digits = input.value.replace(/[\s-]/g, '');
    if (digits.length <= 16) input.value = formatCode(digits);
  }
  renderCode();
}

async function onClaimChosen() {
  const files = Array.from($('claim').files ?? []);
  state.files = await Promise.all(files.map(async (file) => ({ name: file.name, text: await file.text() })));
  renderClaim();
}

function renderClaim() {
  const out = $('claim-state');
  const input = $('claim');
  if (state.files.length === 0) {
    out.className = 'hint';
    out.textContent = '';
    return null;
  }
  try {
    const claim = readClaim(state.files);
    out.className = 'field-ok';
    let text = 'Certificate and key found.';
    if (claim.notAfter != null) {
      const left = claim.notAfter - Math.floor(Date.now() / 1000);
      text += left > 0 ? ` The claim expires in ${minutes(left)}.` : ' By this phone’s clock the claim has expired; get a new one if the gateway refuses it.';
    }
    out.textContent = text;
    input.setAttribute('aria-invalid', 'false');
    return claim;
  } catch (e) {
    if (!(e instanceof ClaimError)) throw e;
    out.className = 'field-bad';
    out.textContent = e.message;
    input.setAttribute('aria-invalid', 'true');
    return null;
  }
}

function renderParameters() {
  const box = $('parameters');
  box.replaceChildren();
  state.parameters.forEach((name, i) => {
    const label = document.createElement('label');
    label.htmlFor = `param-${i}`;
    label.textContent = name;
    const input = document.createElement('input');
    input.type = 'text';
    input.id = `param-${i}`;
    input.name = name;
    input.autocomplete = 'off';
    input.maxLength = 1024;
    box.append(label, input);
  });
  $('parameters-card').hidden = state.parameters.length === 0;
}

function formError(message, focus) {
  const out = $('form-error');
  out.textContent = message;
  out.hidden = false;
  $(focus).focus();
}

async function onSubmit(event) {
  event.preventDefault();
  if (state.busy) return;
  $('form-error').hidden = true;
  if (!renderCode()) {
    formError('Enter the 16-digit setup code from the label.', 'code');
    return;
  }
  const digits = $('code').value.replace(/[\s-]/g, '');
  if (state.files.length === 0) {
    formError('Choose the claim file from your company portal.', 'claim');
    return;
  }
  const claim = renderClaim();
  if (!claim) {
    formError($('claim-state').textContent, 'claim');
    return;
  }
  const parameters = {};
  for (const [i, name] of state.parameters.entries()) {
    const input = $(`param-${i}`);
    const value = input.value.trim();
    if (!value) {
      input.setAttribute('aria-invalid', 'true');
      formError(`Fill in ${name}.`, `param-${i}`);
      return;
    }
    input.setAttribute('aria-invalid', 'false');
    parameters[name] = value;
  }
  if (state.qrSerial && state.serial && state.qrSerial !== state.serial) {
    problem({
      title: 'This is another gateway',
      cause: `The label you scanned is for gateway ${state.qrSerial}, but this page comes from gateway ${state.serial}.`,
      next: ['Connect to the gateway whose label you have, then open its page again.'],
      actions: [['Back', backToForm('code')]],
    });
    return;
  }
  const bundle = {
    v: 1,
    certificate_pem: claim.certificatePem,
    private_key_pem: claim.privateKeyPem,
    not_after: claim.notAfter,
  };
  if (Object.keys(parameters).length) bundle.parameters = parameters;
  const plaintext = utf8.encode(JSON.stringify(bundle));
  if (plaintext.length > MAX_BUNDLE) {
    formError('These files are larger than a claim can be. Choose the claim’s certificate and key only.', 'claim');
    return;
  }
  state.busy = true;
  try {
    await onboard(digits, plaintext);
  } catch (e) {
    failed(e);
  } finally {
    plaintext.fill(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Pairing and hand-over.

async function onboard(digits, plaintext) {
  show('progress');
  markSteps('pair');
  $('progress-hint').textContent = '';
  const random = clientRandom();
  const params = await post('/v1/pair/params', { client_random: toB64(random), client_id: CLIENT_ID, binding: 'none' });
  const sessionId = fromB64(params.session_id, 'session id');
  const gatewayRandom = fromB64(params.gateway_random, 'random');
  const salt = fromB64(params.pbkdf?.salt, 'salt');
  if (params.serial !== state.serial || (state.qrSerial && params.serial !== state.qrSerial)) {
    throw new ProtocolError('serial', `The gateway now says its serial is ${params.serial}.`);
  }
  if (params.suite !== 'P256-SHA256-HKDF-SHA256-HMAC-SHA256' || params.pbkdf?.alg !== 'PBKDF2-HMAC-SHA256') {
    throw new ProtocolError('protocol', `the gateway offers ${params.suite}, which this page does not speak`);
  }
  const iterations = params.pbkdf.iterations;
  const { w0, w1 } = await deriveSecret(digits, params.serial, salt, iterations);
  const ctx = context({ clientRandom: random, gatewayRandom, sessionId, salt, iterations, binding: new Uint8Array(0) });
  const prover = proverStart({ context: ctx, idProver: utf8.encode(CLIENT_ID), idVerifier: utf8.encode(params.serial), w0, w1 });
  const started = await post('/v1/pair/start', { session_id: params.session_id, share_p: toB64(prover.shareP) });
  let confirmed;
  try {
    confirmed = prover.finish(fromB64(started.share_v, 'share'), fromB64(started.confirm_v, 'confirmation'));
  } catch (e) {
    if (e instanceof ProtocolError && e.kind === 'confirmation') {
      // Free the gateway for the next try at once: random bytes reveal nothing about the code.
      post('/v1/pair/finish', { session_id: params.session_id, confirm_p: toB64(clientRandom()) }).catch(() => {});
      e.attemptsLeft = started.attempts_left;
    }
    throw e;
  }
  await post('/v1/pair/finish', { session_id: params.session_id, confirm_p: toB64(confirmed.confirmP) });
  markSteps('hand-over');
  const keys = appKeys(confirmed.kShared, sessionId);
  const sealed = seal(keys.c2s, sessionId, 'claim', 0, plaintext);
  // From here the claim may have reached the gateway: its progress comes from the event
  // stream, whatever the answer to /v1/claim.
  state.following = true;
  let acked;
  try {
    acked = await post('/v1/claim', { session_id: params.session_id, seq: 0, ct: toB64(sealed) });
  } catch (e) {
    if (!(e instanceof Unreachable)) throw e;
    // The claim may have arrived: the gateway's events say so once the page reaches it again.
    $('progress-hint').textContent = 'Lost contact with the gateway while handing over the claim; waiting to hear whether it arrived…';
    lostTimer = setTimeout(() => {
      if (state.following && !['claim-received', 'connecting-with-claim', 'certificate-issued', 'thing-registered'].includes(state.view?.phase)) {
        failed(e);
      }
    }, 30000);
    return;
  }
  const ack = JSON.parse(new TextDecoder().decode(open(keys.s2c, sessionId, 'claim-ack', acked.seq ?? 0, fromB64(acked.ct, 'ack'))));
  if (ack.status !== 'accepted') throw new ProtocolError('protocol', `the gateway answered the claim with “${ack.status}”`);
  if (!state.following) return;
  markSteps('connecting-with-claim');
  if (state.view) onView(state.view);
}

let lostTimer = null;

function failed(e) {
  state.following = false;
  clearTimeout(lostTimer);
  if (e instanceof Refused) return refused(e);
  if (e instanceof Unreachable) {
    return problem({
      title: 'Lost contact with the gateway',
      cause: 'The gateway did not answer.',
      next: [
        'Check that this phone is still connected to the gateway (its setup Wi-Fi or cable) and that the gateway is on.',
        'Then try again.',
      ],
      actions: [['Try again', backToForm('start')]],
    });
  }
  if (e instanceof ProtocolError && e.kind === 'confirmation') {
    return wrongCode(e.attemptsLeft);
  }
  if (e instanceof ProtocolError && e.kind === 'serial') {
    return problem({
      title: 'This is another gateway',
      cause: e.message,
      next: ['Connect to the gateway whose label you have, then open its page again.'],
      actions: [['Start again', reload]],
    });
  }
  return problem({
    title: 'Setup stopped',
    cause: 'The gateway’s answer was not what this page expected.',
    detail: e.message,
    next: ['Reload the page and try again. If this happens again, use iotctl onboard and report the message above.'],
    actions: [['Reload', reload]],
  });
}

function wrongCode(attemptsLeft) {
  if (attemptsLeft === 0) return windowClosedAtCap();
  const left = attemptsLeft == null ? '' : ` The gateway allows ${attemptsLeft} more ${attemptsLeft === 1 ? 'try' : 'tries'} in this setup window.`;
  return problem({
    title: 'Setup code not accepted',
    cause: `The gateway did not accept this setup code.${left}`,
    next: ['Check the 16-digit code on this gateway’s label and type it again.', 'Make sure the label belongs to this gateway (compare the serial number).'],
    actions: [['Enter the code again', () => { $('code').value = ''; renderCode(); backToForm('code')(); }]],
  });
}

function windowClosedAtCap() {
  return problem({
    title: 'Setup is locked',
    cause: 'Too many wrong setup codes: the gateway closed its setup window.',
    next: [
      'Check that you have the right label for this gateway.',
      'Reopen setup on the gateway: press its setup button, or ask someone with access to run “iotctl onboard open” on it. Then reload this page.',
    ],
    actions: [['Reload', reload]],
  });
}

function refused(e) {
  switch (e.code) {
    case 'confirmation_failed':
      return wrongCode(e.attemptsLeft);
    case 'window_closed':
      if (e.attemptsLeft === 0) return windowClosedAtCap();
      return problem({
        title: 'The gateway is not accepting setup',
        cause: 'The gateway’s setup window is closed.',
        detail: e.message,
        next: [
          'Reopen setup on the gateway: press its setup button, or ask someone with access to run “iotctl onboard open” on it.',
          'Then reload this page.',
        ],
        actions: [['Reload', reload]],
      });
    case 'busy':
      return problem({
        title: 'Someone else is setting up this gateway',
        cause: 'Another phone or computer is pairing with the gateway right now.',
        next: ['Wait a minute, then try again.'],
        actions: [['Try again', backToForm('start')]],
      });
    case 'rate_limited': {
      const wait = e.retryAfter ?? 10;
      problem({
        title: 'Too many requests',
        cause: 'The gateway is receiving too many setup requests.',
        next: [`Wait ${wait} ${wait === 1 ? 'second' : 'seconds'}, then try again.`],
        actions: [['Try again', backToForm('start')]],
      });
      // Trying again sooner would only be refused again.
      return holdFirstAction(wait);
    }
    case 'claim_invalid':
      return problem({
        title: 'The gateway refused the claim',
        cause: /does not match/.test(e.message)
          ? 'The key file does not belong to the claim’s certificate.'
          : 'The gateway cannot use these claim files.',
        detail: `The gateway said: ${e.message}`,
        next: [
          'Choose the claim files again: the certificate and the key must come from the same claim.',
          'If the portal gave you one file, choose that file alone.',
        ],
        actions: [['Choose the claim again', chooseClaimAgain]],
      });
    case 'no_session':
    case 'wrong_state':
      return problem({
        title: 'Setup timed out',
        cause: 'The gateway ended the pairing before it finished (each step must come within 30 seconds).',
        next: ['Try again.'],
        actions: [['Try again', backToForm('start')]],
      });
    default:
      return problem({
        title: 'Setup stopped',
        cause: e.message,
        detail: `The gateway refused (${e.code}, HTTP ${e.status}).`,
        next: ['Try again. If this happens again, use iotctl onboard and report the message above.'],
        actions: [['Try again', backToForm('start')]],
      });
  }
}

/** The claim was handed over, and the gateway's provisioning with it failed. */
function failedOnline(error) {
  markSteps(document.querySelector('#steps li.doing')?.dataset.step ?? 'connecting-with-claim', true);
  const newClaim = [
    'Get a new claim from your company portal (a claim is valid for 5 minutes).',
    'Choose it here and set up again: the setup code stays the same.',
  ];
  const again = [['Use a new claim', chooseClaimAgain]];
  const byCode = {
    'claim-expired': {
      title: 'The claim has expired',
      cause: 'AWS IoT refused the claim: it has expired.',
      next: newClaim,
      actions: again,
    },
    'claim-rejected': {
      title: 'AWS IoT refused the claim',
      cause: error.message,
      next: newClaim,
      actions: again,
    },
    'template-rejected': {
      title: 'AWS IoT refused to register the gateway',
      cause: error.message,
      next: ['Check the values you entered for this installation, then set up again with a new claim.', 'If it happens again, ask your cloud administrator: the provisioning template refused the gateway.'],
      actions: again,
    },
  };
  const screen = byCode[error.code] ?? {
    title: 'Setup failed',
    cause: error.message,
    next: ['Set up again with a new claim. If it fails the same way, give the message above to your cloud administrator.'],
    actions: again,
  };
  problem({ ...screen, detail: screen.cause === error.message ? '' : error.message });
}

// ---------------------------------------------------------------------------------------------
// The camera, where the browser allows it (a secure context with BarcodeDetector): the label's
// QR code fills in the code. Elsewhere the installer's camera app reads the QR code, and its
// text is pasted into the code field.

async function startScan() {
  const video = $('video');
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: 'environment' } });
  } catch {
    $('code-state').className = 'field-bad';
    $('code-state').textContent = 'The camera is not available: type the code, or paste the QR code’s text.';
    return;
  }
  const detector = new window.BarcodeDetector({ formats: ['qr_code'] });
  video.srcObject = stream;
  $('scanner').hidden = false;
  $('scan-row').hidden = true;
  await video.play().catch(() => {});
  const stop = () => {
    stream.getTracks().forEach((t) => t.stop());
    video.srcObject = null;
    $('scanner').hidden = true;
    $('scan-row').hidden = false;
  };
  $('scan-stop').onclick = () => {
    stop();
    $('code').focus();
  };
  const look = async () => {
    if (!video.srcObject) return;
    let found = [];
    try {
      found = await detector.detect(video);
    } catch {
      found = [];
    }
    const label = found.find((code) => code.rawValue?.startsWith(QR_PREFIX));
    if (label) {
      stop();
      $('code').value = label.rawValue;
      renderCode();
      $('claim').focus();
      return;
    }
    // One look per video frame while the camera is open.
    video.requestVideoFrameCallback ? video.requestVideoFrameCallback(look) : requestAnimationFrame(look);
  };
  look();
}

// ---------------------------------------------------------------------------------------------

async function main() {
  $('code').addEventListener('input', onCodeInput);
  $('claim').addEventListener('change', () => {
    onClaimChosen().catch((e) => {
      $('claim-state').className = 'field-bad';
      $('claim-state').textContent = `These files could not be read (${e.message}).`;
    });
  });
  $('setup').addEventListener('submit', onSubmit);
  if ('BarcodeDetector' in window && window.isSecureContext && navigator.mediaDevices?.getUserMedia) {
    $('scan-row').hidden = false;
    $('scan').addEventListener('click', startScan);
  }
  let form;
  try {
    form = await call('GET', '/v1/form');
  } catch (e) {
    return problem({
      title: 'Cannot reach the gateway',
      cause: e instanceof Refused ? e.message : 'The gateway did not answer.',
      next: ['Check that this phone is connected to the gateway (its setup Wi-Fi or cable), then reload.'],
      actions: [['Reload', reload]],
    });
  }
  state.serial = form.serial;
  state.parameters = form.parameters ?? [];
  $('serial').textContent = form.serial;
  $('shared-warning').hidden = form.direct_link !== false;
  renderParameters();
  onView(form.status);
  watchEvents();
  // Onboarded just now, or provisioned before: nothing to do here.
  const provisioned = form.status.phase === 'waiting' || form.status.phase === 'connected';
  if (provisioned && form.status.thing_name) {
    $('thing-name').textContent = form.status.thing_name;
    show('done', 'This gateway is set up');
    return;
  }
  if (form.status.window !== 'open') {
    return refused(new Refused(403, { error: 'window_closed', message: 'The setup window is closed.', attempts_left: form.status.attempts_left }));
  }
  show('form');
}

main();
