// Reading the claim the installer's portal gave them, from the files they pick: the certificate
// and key as two PEM files (AWS's console and `aws iot create-provisioning-claim` with
// --query), one PEM file holding both, or one JSON file as CreateProvisioningClaim returns it
// ({certificatePem, keyPair: {PrivateKey}, expiration}). The gateway checks the claim again
// (the key must be the certificate's); this only gathers it, and words what is missing.

/** A refusal for the installer: `message` says what is wrong with which file. */
export class ClaimError extends Error {}

const MAX_FILE = 64 * 1024;
const CERT_RE = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;
const KEY_RE = /-----BEGIN (RSA |EC )?PRIVATE KEY-----[\s\S]*?-----END \1PRIVATE KEY-----/g;

/**
 * Gathers a claim from `files`: `[{name, text}]`. Returns `{certificatePem, privateKeyPem,
 * notAfter}` (`notAfter` in Unix seconds, or null when the files do not say).
 */
export function readClaim(files) {
  if (files.length === 0) throw new ClaimError('Choose the claim file, or the certificate and key files.');
  let certificatePem = null;
  let privateKeyPem = null;
  let expiration = null;
  for (const { name, text } of files) {
    if (text.length > MAX_FILE) {
      throw new ClaimError(`“${name}” is ${Math.round(text.length / 1024)} KB: too large to be a claim certificate or key.`);
    }
    const found = fromJson(name, text) ?? fromPem(name, text);
    if (found.certificatePem) {
      if (certificatePem) throw new ClaimError(`“${name}” holds a second certificate: choose one claim only.`);
      certificatePem = found.certificatePem;
    }
    if (found.privateKeyPem) {
      if (privateKeyPem) throw new ClaimError(`“${name}” holds a second private key: choose one claim only.`);
      privateKeyPem = found.privateKeyPem;
    }
    if (found.expiration != null) expiration = found.expiration;
  }
  if (!certificatePem) throw new ClaimError('The claim’s certificate is missing: add the certificate file (…certificate.pem.crt).');
  if (!privateKeyPem) throw new ClaimError('The claim’s private key is missing: add the key file (…private.pem.key).');
  let notAfter = expiration;
  if (notAfter == null) {
    try {
      notAfter = certificateNotAfter(certificatePem);
    } catch {
      throw new ClaimError('The claim’s certificate is damaged: get the claim files again.');
    }
  }
  return { certificatePem, privateKeyPem, notAfter };
}

function fromJson(name, text) {
  const trimmed = text.trim();
  if (!trimmed.startsWith('{')) return null;
  let value;
  try {
    value = JSON.parse(trimmed);
  } catch {
    throw new ClaimError(`“${name}” is not a claim file: it starts like JSON but is not valid JSON.`);
  }
  const certificatePem = value.certificatePem ?? value.certificate_pem;
  const privateKeyPem = value.keyPair?.PrivateKey ?? value.private_key_pem;
  if (typeof certificatePem !== 'string' || typeof privateKeyPem !== 'string') {
    throw new ClaimError(`“${name}” is JSON, but not a claim: it has no certificatePem and keyPair.PrivateKey.`);
  }
  const expiration = value.expiration ?? value.not_after ?? null;
  return {
    certificatePem: fromPem(name, certificatePem).certificatePem,
    privateKeyPem: fromPem(name, privateKeyPem).privateKeyPem,
    expiration: toUnixSeconds(expiration),
  };
}

function fromPem(name, text) {
  if (/-----BEGIN ENCRYPTED PRIVATE KEY-----/.test(text)) {
    throw new ClaimError(`“${name}” holds a password-protected key: the gateway needs the key as the portal gave it, unencrypted.`);
  }
  const certificates = text.match(CERT_RE) ?? [];
  const keys = text.match(KEY_RE) ?? [];
  if (certificates.length === 0 && keys.length === 0) {
    throw new ClaimError(`“${name}” is neither a certificate nor a private key (no PEM “-----BEGIN …” block).`);
  }
  if (keys.length > 1) throw new ClaimError(`“${name}” holds ${keys.length} private keys: choose the claim’s key only.`);
  return {
    // A chain after the claim certificate is kept: the gateway takes it.
    certificatePem: certificates.length ? certificates.join('\n') + '\n' : null,
    privateKeyPem: keys.length ? keys[0] + '\n' : null,
    expiration: null,
  };
}

/** CreateProvisioningClaim's `expiration`: Unix seconds (maybe fractional), or RFC 3339 text. */
function toUnixSeconds(value) {
  if (value == null) return null;
  if (typeof value === 'number' && Number.isFinite(value)) return Math.floor(value);
  if (typeof value === 'string') {
    const ms = Date.parse(value);
    if (!Number.isNaN(ms)) return Math.floor(ms / 1000);
  }
  return null;
}

/** The notAfter of the first certificate in `pem`, in Unix seconds, read from its DER. */
export function certificateNotAfter(pem) {
  const body = pem.match(/-----BEGIN CERTIFICATE-----([\s\S]*?)-----END CERTIFICATE-----/)[1];
  const der = Uint8Array.from(atob(body.replace(/\s+/g, '')), (c) => c.charCodeAt(0));
  // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version?, serialNumber,
  // signature, issuer, validity SEQUENCE { notBefore, notAfter }, … } … }
  const certificate = readTlv(der, 0);
  const tbs = readTlv(der, certificate.start);
  let at = tbs.start;
  let field = readTlv(der, at);
  if (field.tag === 0xa0) field = readTlv(der, field.end);
  const signature = readTlv(der, field.end);
  const issuer = readTlv(der, signature.end);
  const validity = readTlv(der, issuer.end);
  const notBefore = readTlv(der, validity.start);
  const notAfter = readTlv(der, notBefore.end);
  return derTime(notAfter.tag, new TextDecoder().decode(der.subarray(notAfter.start, notAfter.end)));
}

function readTlv(der, at) {
  if (at + 2 > der.length) throw new Error('truncated');
  const tag = der[at];
  let length = der[at + 1];
  let start = at + 2;
  if (length & 0x80) {
    const count = length & 0x7f;
    if (count === 0 || count > 3) throw new Error('bad length');
    length = 0;
    for (let i = 0; i < count; i++) length = length * 256 + der[start + i];
    start += count;
  }
  if (start + length > der.length) throw new Error('truncated');
  return { tag, start, end: start + length };
}

function derTime(tag, text) {
  // UTCTime YYMMDDHHMMSSZ (years 1950-2049), GeneralizedTime YYYYMMDDHHMMSSZ.
  const m = tag === 0x17 ? /^(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(text) : /^(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(text);
  if (!m) throw new Error('bad time');
  let year = Number(m[1]);
  if (tag === 0x17) year += year < 50 ? 2000 : 1900;
  return Date.UTC(year, m[2] - 1, m[3], m[4], m[5], m[6]) / 1000;
}
