// The page's protocol module against the published vectors (RFC 9383 App. C and the profile's
// draft cases, the same files the Rust side reads) and the negative cases of the profile's §5.7.
// Run by `make test` (scripts/test-page.sh) under node's test runner.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { p256 } from '@noble/curves/nist.js';

import {
  ProtocolError,
  aad,
  appKeys,
  bytesToHex,
  codeState,
  context,
  deriveSecret,
  formatCode,
  fromB64,
  hexToBytes,
  nonce,
  open,
  parseCode,
  parseQr,
  pbkdfInput,
  proverStart,
  seal,
  toB64,
  verhoeffValid,
} from '../src/protocol.js';

const fixtures = new URL('../../tests/fixtures/onboarding/', import.meta.url);
const rfc = JSON.parse(readFileSync(new URL('rfc9383-p256-sha256.json', fixtures), 'utf8'));
const draft = JSON.parse(readFileSync(new URL('iotd-onboard-v1-draft.json', fixtures), 'utf8'));
const ascii = (text) => new TextEncoder().encode(text);
const hex = bytesToHex;
const big = (h) => BigInt('0x' + h);

/** The verifier's share from y, as the gateway computes it: y·G + w0·N. */
function verifierShare(w0, y) {
  const { Point } = p256;
  return Point.BASE.multiply(y).add(Point.fromBytes(hexToBytes(rfc.N)).multiply(w0)).toBytes(false);
}

test('RFC 9383 App. C, P256-SHA256: the prover reproduces every value', () => {
  const prover = proverStart({
    context: ascii(rfc.context_ascii),
    idProver: ascii(rfc.idProver_ascii),
    idVerifier: ascii(rfc.idVerifier_ascii),
    w0: big(rfc.w0),
    w1: big(rfc.w1),
    x: big(rfc.x),
  });
  assert.equal(hex(prover.shareP), rfc.shareP);
  const done = prover.finish(hexToBytes(rfc.shareV), hexToBytes(rfc.confirmV));
  assert.equal(hex(done.Z), rfc.Z);
  assert.equal(hex(done.V), rfc.V);
  assert.equal(hex(done.TT), rfc.TT);
  assert.equal(hex(done.kMain), rfc.K_main);
  assert.equal(hex(done.kConfirmP), rfc.K_confirmP);
  assert.equal(hex(done.kConfirmV), rfc.K_confirmV);
  assert.equal(hex(done.confirmP), rfc.confirmP);
  assert.equal(hex(done.kShared), rfc.K_shared);
  assert.equal(hex(verifierShare(big(rfc.w0), big(rfc.y))), rfc.shareV);
});

for (const v of draft) {
  test(`profile vector ${v.name}: code, PBKDF, context, full run, keys and AEAD`, async () => {
    assert.equal(parseCode(v.setup_code), v.setup_code_normalized);
    assert.equal(formatCode(v.setup_code_normalized), v.setup_code);
    assert.equal(hex(pbkdfInput(v.setup_code_normalized, v.serial_ascii)), v.pbkdf.input);
    const { w0, w1 } = await deriveSecret(
      v.setup_code_normalized,
      v.serial_ascii,
      hexToBytes(v.pbkdf.salt),
      v.pbkdf.iterations,
    );
    assert.equal(w0.toString(16).padStart(64, '0'), v.w0);
    assert.equal(w1.toString(16).padStart(64, '0'), v.w1);

    const ctx = context({
      clientRandom: hexToBytes(v.client_random),
      gatewayRandom: hexToBytes(v.gateway_random),
      sessionId: hexToBytes(v.session_id),
      salt: hexToBytes(v.pbkdf.salt),
      iterations: v.pbkdf.iterations,
      binding: hexToBytes(v.binding),
    });
    assert.equal(hex(ctx), v.context);

    const prover = proverStart({
      context: ctx,
      idProver: ascii(v.idProver_ascii),
      idVerifier: ascii(v.idVerifier_ascii),
      w0,
      w1,
      x: big(v.x),
    });
    assert.equal(hex(prover.shareP), v.shareP);
    const done = prover.finish(hexToBytes(v.shareV), hexToBytes(v.confirmV));
    assert.equal(hex(done.Z), v.Z);
    assert.equal(hex(done.V), v.V);
    assert.equal(hex(done.TT), v.TT);
    assert.equal(hex(done.kMain), v.K_main);
    assert.equal(hex(done.confirmP), v.confirmP);
    assert.equal(hex(done.kShared), v.K_shared);

    const sessionId = hexToBytes(v.session_id);
    const keys = appKeys(done.kShared, sessionId);
    assert.equal(hex(keys.c2s), v.k_c2s);
    assert.equal(hex(keys.s2c), v.k_s2c);
    assert.equal(hex(nonce(v.claim.seq)), v.claim.nonce);
    assert.equal(hex(aad(sessionId, 'claim', v.claim.seq)), v.claim.aad);
    assert.equal(hex(aad(sessionId, 'claim-ack', v.claim_ack.seq)), v.claim_ack.aad);
    const sealed = seal(keys.c2s, sessionId, 'claim', v.claim.seq, ascii(v.claim.plaintext_utf8));
    assert.equal(hex(sealed), v.claim.ciphertext_and_tag);
    const ack = open(keys.s2c, sessionId, 'claim-ack', 0, hexToBytes(v.claim_ack.ciphertext_and_tag));
    assert.equal(new TextDecoder().decode(ack), v.claim_ack.plaintext_utf8);
  });
}

test('the browser case binds nothing and names the web client', () => {
  const browser = draft.find((v) => v.name === 'browser-no-binding');
  assert.ok(browser, 'the draft has the browser case');
  assert.equal(browser.binding, '');
  assert.match(browser.idProver_ascii, /^web\//);
});

test('setup codes: every single substitution and neighbour swap is refused', () => {
  const code = '8271936405182740';
  assert.ok(verhoeffValid(code));
  let refused = 0;
  for (let i = 0; i < 16; i++) {
    for (let d = 0; d < 10; d++) {
      if (String(d) === code[i]) continue;
      const changed = code.slice(0, i) + d + code.slice(i + 1);
      assert.equal(verhoeffValid(changed), false, changed);
      assert.throws(() => parseCode(changed), (e) => e instanceof ProtocolError && e.kind === 'code');
      refused++;
    }
  }
  assert.equal(refused, 144);
  for (let i = 0; i < 15; i++) {
    const swapped = code.slice(0, i) + code[i + 1] + code[i] + code.slice(i + 2);
    if (swapped !== code) assert.equal(verhoeffValid(swapped), false, swapped);
  }
});

test('setup codes: spaces and hyphens are ignored, anything else is named', () => {
  for (const written of ['8271-9364-0518-2740', '8271 9364 0518 2740', ' 82719364-05182740 ']) {
    assert.equal(parseCode(written), '8271936405182740');
  }
  assert.match(codeState('8271_9364').problem, /Character 5 is not a digit/);
  assert.deepEqual(codeState('8271-93'), { digits: '827193', complete: false, problem: null });
  assert.match(codeState('82719364051827401').problem, /17 digits/);
  assert.match(codeState('8271936405182741').problem, /mistyped/);
});

test('the QR payload: serial and code, or a clear refusal', () => {
  assert.deepEqual(parseQr('IOTD1:IOTGW-0001234:8271936405182740'), {
    serial: 'IOTGW-0001234',
    digits: '8271936405182740',
  });
  assert.deepEqual(parseQr(' IOTD1:GW-7:8271936405182740\n'), { serial: 'GW-7', digits: '8271936405182740' });
  for (const bad of ['MT:Y.K9042C00KA0648G00', 'IOTD1:IOTGW-1:827193640518274', 'IOTD1::8271936405182740', 'IOTD1:IOT GW:8271936405182740', 'IOTD1:A:B:8271936405182740']) {
    assert.throws(() => parseQr(bad), ProtocolError, bad);
  }
  assert.throws(() => parseQr('IOTD1:IOTGW-1:8271936405182741'), (e) => e.kind === 'code');
});

test('base64url without padding round-trips and refuses other alphabets', () => {
  for (let n = 0; n < 70; n++) {
    const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 37 + n) & 0xff);
    const text = toB64(bytes);
    assert.doesNotMatch(text, /[=+/]/);
    assert.deepEqual(fromB64(text, 'field'), bytes);
    assert.equal(text, Buffer.from(bytes).toString('base64url'));
  }
  assert.throws(() => fromB64('ab+/', 'field'), ProtocolError);
  assert.throws(() => fromB64('abcde', 'field'), ProtocolError);
});

// The profile's §5.7 negative cases, in the prover's role.
test('negative cases: bad shares, confirmations, ciphertexts, seq and msg_type are refused', () => {
  const v = draft[1];
  const start = () =>
    proverStart({
      context: hexToBytes(v.context),
      idProver: ascii(v.idProver_ascii),
      idVerifier: ascii(v.idVerifier_ascii),
      w0: big(v.w0),
      w1: big(v.w1),
      x: big(v.x),
    });
  const confirmV = hexToBytes(v.confirmV);
  const shareV = hexToBytes(v.shareV);
  const { Point } = p256;
  const compressed = Point.fromBytes(shareV).toBytes(true);
  const offCurve = shareV.slice();
  offCurve[64] ^= 1;
  const identityLike = new Uint8Array(65);
  identityLike[0] = 4;
  const mask = Point.fromBytes(hexToBytes(rfc.N)).multiply(big(v.w0)).toBytes(false);
  for (const [what, share] of [
    ['a 33-byte compressed share', compressed],
    ['an off-curve point', offCurve],
    ['the identity', identityLike],
    ['the mask w0·N', mask],
  ]) {
    assert.throws(() => start().finish(share, confirmV), ProtocolError, what);
  }
  const flipped = confirmV.slice();
  flipped[0] ^= 0x80;
  assert.throws(() => start().finish(shareV, flipped), (e) => e.kind === 'confirmation');
  assert.throws(() => start().finish(shareV, confirmV.subarray(0, 31)), ProtocolError);
  assert.doesNotThrow(() => start().finish(shareV, confirmV));

  const sessionId = hexToBytes(v.session_id);
  const s2c = hexToBytes(v.k_s2c);
  const sealed = hexToBytes(v.claim_ack.ciphertext_and_tag);
  const bit = sealed.slice();
  bit[3] ^= 1;
  assert.throws(() => open(s2c, sessionId, 'claim-ack', 0, bit), ProtocolError, 'one bit flipped');
  assert.throws(() => open(s2c, sessionId, 'claim-ack', 1, sealed), ProtocolError, 'wrong seq');
  assert.throws(() => open(s2c, sessionId, 'claim', 0, sealed), ProtocolError, 'wrong msg_type');
  assert.throws(() => open(hexToBytes(v.k_c2s), sessionId, 'claim-ack', 0, sealed), ProtocolError, 'reflected');
});
