// The client side of iotd-onboard/1 (the profile's §5): the setup code, SPAKE2+ (RFC 9383,
// P256-SHA256-HKDF-SHA256-HMAC-SHA256) as the prover, the session context, the application keys
// and the sealed channel. Pure functions over Uint8Array, no I/O: the page and node's tests use
// the same module.
//
// Only noble's libraries, never WebCrypto: the page is served over plain HTTP on the gateway's
// direct links, which is not a secure context, and there `crypto.subtle` does not exist.
// `crypto.getRandomValues` does, and noble's randomBytes uses it.

import { p256 } from '@noble/curves/nist.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { hmac } from '@noble/hashes/hmac.js';
import { hkdf } from '@noble/hashes/hkdf.js';
import { pbkdf2Async } from '@noble/hashes/pbkdf2.js';
import { gcm } from '@noble/ciphers/aes.js';
import { concatBytes, randomBytes, utf8ToBytes } from '@noble/hashes/utils.js';

export const PROFILE = 'iotd-onboard/1';
export const SUITE = 'P256-SHA256-HKDF-SHA256-HMAC-SHA256';
export const PBKDF_ALG = 'PBKDF2-HMAC-SHA256';
export const CODE_DIGITS = 16;
export const QR_PREFIX = 'IOTD1:';

const Point = p256.Point;
const ORDER = Point.CURVE().n;
const SHARE_LEN = 65;
const CONFIRM_LEN = 32;

// RFC 9383's M and N for P-256 (uncompressed SEC1).
const M_BYTES = hexToBytes(
  '04886e2f97ace46e55ba9dd7242579f2993b64e16ef3dcab95afd497333d8fa12f' +
    '5ff355163e43ce224e0b0e65ff02ac8e5c7be09419c785e0ca547d55a12e2d20',
);
const N_BYTES = hexToBytes(
  '04d8bbd6c639c62937b04d997f38c3770719c629d7014d49a24b4f98baa1292b49' +
    '07d60aa6bfade45008a636337f5168c64d9bd36034808cd564490b1e656edbe7',
);
const M = Point.fromBytes(M_BYTES);
const N = Point.fromBytes(N_BYTES);

/** A refusal the page words for the installer: `kind` says which, `message` is a sentence. */
export class ProtocolError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

// ---------------------------------------------------------------------------------------------
// Bytes.

export function hexToBytes(hex) {
  if (hex.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(hex)) {
    throw new Error('not hexadecimal');
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) {
    out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  }
  return out;
}

export function bytesToHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

const B64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

/** Base64url without padding, as every binary field of the profile. */
export function toB64(bytes) {
  let out = '';
  for (let i = 0; i < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | ((bytes[i + 1] ?? 0) << 8) | (bytes[i + 2] ?? 0);
    const chars = Math.min(4, Math.ceil(((bytes.length - i) * 8) / 6));
    for (let c = 0; c < chars; c++) out += B64URL[(n >> (18 - 6 * c)) & 63];
  }
  return out;
}

/** Reads unpadded base64url; `what` names the field in the error. */
export function fromB64(text, what) {
  if (typeof text !== 'string' || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) {
    throw new ProtocolError('protocol', `the gateway's ${what} is not base64url`);
  }
  const out = new Uint8Array(Math.floor((text.length * 3) / 4));
  let bits = 0;
  let value = 0;
  let o = 0;
  for (const c of text) {
    value = (value << 6) | B64URL.indexOf(c);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (value >> bits) & 0xff;
    }
  }
  return out;
}

/** An 8-byte little-endian length, then the bytes (RFC 9383's and the profile's `lp`). */
export function lp(bytes) {
  const out = new Uint8Array(8 + bytes.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(bytes.length), true);
  out.set(bytes, 8);
  return out;
}

export function be32(n) {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, n, false);
  return out;
}

export function be64(n) {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(n), false);
  return out;
}

function scalarBytes(s) {
  // toString(16) drops leading zeros: without the padding about one run in 256 would give
  // another transcript.
  return hexToBytes(s.toString(16).padStart(64, '0'));
}

function bytesToBigInt(bytes) {
  return bytes.length === 0 ? 0n : BigInt('0x' + bytesToHex(bytes));
}

// ---------------------------------------------------------------------------------------------
// The setup code and the QR payload.

const VERHOEFF_D = [
  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
  [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
  [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
  [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
  [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
  [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
  [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
  [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
  [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
  [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
];
const VERHOEFF_P = [
  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
  [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
  [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
  [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
  [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
  [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
  [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
  [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
];

/** Whether a string of digits ends in its valid Verhoeff check digit. */
export function verhoeffValid(digits) {
  let check = 0;
  const values = Array.from(digits, Number).reverse();
  values.forEach((d, i) => {
    check = VERHOEFF_D[check][VERHOEFF_P[i % 8][d]];
  });
  return digits.length > 0 && check === 0;
}

/**
 * Reads a setup code as typed: spaces and hyphens are ignored; then 16 digits whose check digit
 * matches. Returns the 16 digits; throws a ProtocolError of kind `code` with a sentence. The
 * check digit catches every mistyped digit and every swap of neighbours before the code costs
 * one of the window's attempts.
 */
export function parseCode(text) {
  const state = codeState(text);
  if (state.problem) throw new ProtocolError('code', state.problem);
  return state.digits;
}

/**
 * Where a code being typed stands: `{digits, complete, problem}`, `problem` a sentence or null.
 * A code still short of 16 digits has no problem yet.
 */
export function codeState(text) {
  let digits = '';
  let position = 0;
  for (const c of text) {
    position++;
    if (c === '-' || /\s/.test(c)) continue;
    if (!/^[0-9]$/.test(c)) {
      return {
        digits,
        complete: false,
        problem: `Character ${position} is not a digit. The setup code is 16 digits.`,
      };
    }
    digits += c;
  }
  if (digits.length > CODE_DIGITS) {
    return {
      digits,
      complete: false,
      problem: `That is ${digits.length} digits; the setup code has 16.`,
    };
  }
  if (digits.length < CODE_DIGITS) {
    return { digits, complete: false, problem: null };
  }
  if (!verhoeffValid(digits)) {
    return {
      digits,
      complete: true,
      problem:
        'This code is not right: a digit is mistyped, or two are swapped. Check it against the label.',
    };
  }
  return { digits, complete: true, problem: null };
}

/** `XXXX-XXXX-XXXX-XXXX`, as on the label, from up to 16 digits. */
export function formatCode(digits) {
  return digits.replace(/(\d{4})(?=\d)/g, '$1-');
}

/** Checks a serial as the gateway does: 1 to 64 printable ASCII characters, no space or `:`. */
export function checkSerial(serial) {
  return serial.length >= 1 && serial.length <= 64 && /^[\x21-\x39\x3b-\x7e]+$/.test(serial);
}

/** Reads the label's QR text `IOTD1:<SERIAL>:<16 digits>`: `{serial, digits}`. */
export function parseQr(payload) {
  const text = payload.trim();
  if (!text.startsWith(QR_PREFIX)) {
    throw new ProtocolError('qr', 'This is not the text of an iotd label’s QR code (it starts with IOTD1:).');
  }
  const rest = text.slice(QR_PREFIX.length);
  const at = rest.lastIndexOf(':');
  const serial = rest.slice(0, Math.max(at, 0));
  const digits = rest.slice(at + 1);
  if (at < 0 || !checkSerial(serial) || !/^[0-9]{16}$/.test(digits)) {
    throw new ProtocolError('qr', 'The QR code’s text is damaged: copy it again.');
  }
  return { serial, digits: parseCode(digits) };
}

// ---------------------------------------------------------------------------------------------
// SPAKE2+.

/** The PBKDF's input: lp(code) ‖ lp("") ‖ lp(serial) (the profile's §5.2). */
export function pbkdfInput(digits, serial) {
  return concatBytes(lp(utf8ToBytes(digits)), lp(new Uint8Array(0)), lp(utf8ToBytes(serial)));
}

/**
 * w0 and w1 from the code (16 digits) and the gateway's PBKDF parameters: PBKDF2-HMAC-SHA256
 * to 80 bytes, each half reduced mod n (not noble's mapHashToField, which is another
 * reduction). `asyncTick` lets the page repaint during the 100 000 iterations.
 */
export async function deriveSecret(digits, serial, salt, iterations) {
  const output = await pbkdf2Async(sha256, pbkdfInput(digits, serial), salt, {
    c: iterations,
    dkLen: 80,
    asyncTick: 20,
  });
  const w0 = bytesToBigInt(output.subarray(0, 40)) % ORDER;
  const w1 = bytesToBigInt(output.subarray(40, 80)) % ORDER;
  output.fill(0);
  if (w0 === 0n || w1 === 0n) throw new ProtocolError('protocol', 'w0 or w1 is zero');
  return { w0, w1 };
}

/** The session's Context (the profile's §5.5): SHA-256 of the session's public values. */
export function context({ clientRandom, gatewayRandom, sessionId, salt, iterations, binding }) {
  return sha256(
    concatBytes(
      lp(utf8ToBytes(PROFILE)),
      lp(utf8ToBytes(SUITE)),
      lp(clientRandom),
      lp(gatewayRandom),
      lp(sessionId),
      lp(salt),
      lp(be32(iterations)),
      lp(binding),
    ),
  );
}

/**
 * Reads a peer's share: 65 bytes, 0x04, on the curve, not the identity. noble's fromBytes also
 * takes compressed points, hence the explicit length and prefix checks.
 */
function decodeShare(bytes) {
  if (bytes.length !== SHARE_LEN || bytes[0] !== 0x04) {
    throw new ProtocolError('protocol', 'the gateway’s share is not an uncompressed P-256 point');
  }
  let point;
  try {
    point = Point.fromBytes(bytes);
    point.assertValidity();
  } catch {
    throw new ProtocolError('protocol', 'the gateway’s share is not a point on P-256');
  }
  if (point.is0()) throw new ProtocolError('protocol', 'the gateway’s share is the identity');
  return point;
}

function randomScalar() {
  // A 48-byte draw reduced mod n is within 2^-128 of uniform; 0 is redrawn.
  for (;;) {
    const s = bytesToBigInt(randomBytes(48)) % ORDER;
    if (s !== 0n) return s;
  }
}

/**
 * The prover's first step. `x` is for the test vectors only; the page leaves it out. Returns
 * `{shareP, finish(shareV, confirmV)}`; `finish` checks the gateway's confirmation (a mismatch
 * is a wrong code, or tampering) and returns `{confirmP, kShared}` and, for the vectors, the
 * intermediate values.
 */
export function proverStart({ context: ctx, idProver, idVerifier, w0, w1, x }) {
  const scalar = x ?? randomScalar();
  const shareP = Point.BASE.multiply(scalar).add(M.multiply(w0)).toBytes(false);
  return {
    shareP,
    finish(shareV, confirmV) {
      const y = decodeShare(shareV);
      if (confirmV.length !== CONFIRM_LEN) {
        throw new ProtocolError('protocol', 'the gateway’s confirmation is not 32 bytes');
      }
      const unmasked = y.subtract(N.multiply(w0));
      if (unmasked.is0()) throw new ProtocolError('protocol', 'the gateway’s share is the mask');
      // P-256's cofactor is 1.
      const Z = unmasked.multiply(scalar).toBytes(false);
      const V = unmasked.multiply(w1).toBytes(false);
      const TT = concatBytes(
        lp(ctx),
        lp(idProver),
        lp(idVerifier),
        lp(M_BYTES),
        lp(N_BYTES),
        lp(shareP),
        lp(shareV),
        lp(Z),
        lp(V),
        lp(scalarBytes(w0)),
      );
      const kMain = sha256(TT);
      const confirmation = hkdf(sha256, kMain, new Uint8Array(0), utf8ToBytes('ConfirmationKeys'), 64);
      const kConfirmP = confirmation.subarray(0, 32);
      const kConfirmV = confirmation.subarray(32, 64);
      const kShared = hkdf(sha256, kMain, new Uint8Array(0), utf8ToBytes('SharedKey'), 32);
      const expected = hmac(sha256, kConfirmV, shareP);
      if (!equalBytes(expected, confirmV)) {
        throw new ProtocolError(
          'confirmation',
          'The gateway did not prove it knows this setup code: a wrong code, or another device answering in its place.',
        );
      }
      const confirmP = hmac(sha256, kConfirmP, shareV);
      return { confirmP, kShared, Z, V, TT, kMain, kConfirmP, kConfirmV };
    },
  };
}

function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

// ---------------------------------------------------------------------------------------------
// The sealed channel.

/** `{c2s, s2c}`: HKDF-SHA256 of K_shared, salted with the session id. */
export function appKeys(kShared, sessionId) {
  return {
    c2s: hkdf(sha256, kShared, sessionId, utf8ToBytes(`${PROFILE} c2s`), 32),
    s2c: hkdf(sha256, kShared, sessionId, utf8ToBytes(`${PROFILE} s2c`), 32),
  };
}

/** `00000000 ‖ be64(seq)`. */
export function nonce(seq) {
  return concatBytes(new Uint8Array(4), be64(seq));
}

/** `lp(PROFILE) ‖ lp(session_id) ‖ lp(msg_type) ‖ be64(seq)`. */
export function aad(sessionId, msgType, seq) {
  return concatBytes(lp(utf8ToBytes(PROFILE)), lp(sessionId), lp(utf8ToBytes(msgType)), be64(seq));
}

/** AES-256-GCM: ciphertext ‖ 16-byte tag. */
export function seal(key, sessionId, msgType, seq, plaintext) {
  return gcm(key, nonce(seq), aad(sessionId, msgType, seq)).encrypt(plaintext);
}

/** Opens what `seal` made; throws a ProtocolError when the tag does not match. */
export function open(key, sessionId, msgType, seq, sealed) {
  try {
    return gcm(key, nonce(seq), aad(sessionId, msgType, seq)).decrypt(sealed);
  } catch {
    throw new ProtocolError('protocol', 'the gateway’s sealed answer did not open');
  }
}

/** 32 random bytes (the client's random). */
export function clientRandom() {
  return randomBytes(32);
}
