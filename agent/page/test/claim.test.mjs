// The page's claim reader: what portals hand out (CreateProvisioningClaim's JSON, PEM files)
// and what goes wrong with it, in words for the installer. Run by `make test` (make test-page).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { ClaimError, certificateNotAfter, readClaim } from '../src/claim.js';

// A self-signed P-256 certificate valid until 2036-12-02T02:21:59Z, and its key.
const CERT = "-----BEGIN CERTIFICATE-----\nMIIBdTCCARugAwIBAgIUB4X0J5fC1aW+cwOgIVJ7VX4gd4kwCgYIKoZIzj0EAwIw\nEDEOMAwGA1UEAwwFY2xhaW0wHhcNMjYxMjA1MDIyMTU5WhcNMzYxMjAyMDIyMTU5\nWjAQMQ4wDAYDVQQDDAVjbGFpbTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABC5K\n45taJxx9R03yAJRpKVzDV1OBpsNq/9ihxwfW4rRR8EkBvisJ3iA6z18IiWwXSLuF\nTpjFm8rbfolKLbTMiy2jUzBRMB0GA1UdDgQWBBQmmPJivgpCw8GUGu4blEcSxwzM\nvjAfBgNVHSMEGDAWgBQmmPJivgpCw8GUGu4blEcSxwzMvjAPBgNVHRMBAf8EBTAD\nAQH/MAoGCCqGSM49BAMCA0gAMEUCIF+wiAiW/nGKuSJz8hrCj6Sfs3ytkXgWqQ0l\nWlwJsC5CAiEAg+HPDlkLn5jl4IBU1SwwRk4PZ9aXo8QxmndgLDHkEiI=\n-----END CERTIFICATE-----\n";
const KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgtiB5C2Q6259OPSE7\nNjeEtzvRXhM8E0S9f6QnK/QZDi+hRANCAAQuSuObWiccfUdN8gCUaSlcw1dTgabD\nav/YoccH1uK0UfBJAb4rCd4gOs9fCIlsF0i7hU6YxZvK236JSi20zIst\n-----END PRIVATE KEY-----\n";
const NOT_AFTER = 2111797319;

test('two PEM files, in either order: the certificate, the key and its expiry', () => {
  for (const files of [
    [{ name: 'c.pem.crt', text: CERT }, { name: 'p.pem.key', text: KEY }],
    [{ name: 'p.pem.key', text: KEY }, { name: 'c.pem.crt', text: CERT }],
  ]) {
    const claim = readClaim(files);
    assert.equal(claim.certificatePem, CERT);
    assert.equal(claim.privateKeyPem, KEY);
    assert.equal(claim.notAfter, NOT_AFTER);
  }
});

test('one PEM file with both, and one CreateProvisioningClaim answer', () => {
  assert.equal(readClaim([{ name: 'both.pem', text: CERT + KEY }]).notAfter, NOT_AFTER);
  const answer = {
    certificateId: 'abc',
    certificatePem: CERT,
    keyPair: { PublicKey: '-----BEGIN PUBLIC KEY-----\n...', PrivateKey: KEY },
    expiration: 1735689600.0,
  };
  const claim = readClaim([{ name: 'claim.json', text: JSON.stringify(answer) }]);
  assert.equal(claim.privateKeyPem, KEY);
  assert.equal(claim.notAfter, 1735689600, 'the answer\'s expiration, not the certificate\'s');
  const rfc3339 = { ...answer, expiration: '2026-01-01T00:05:00Z' };
  assert.equal(readClaim([{ name: 'c.json', text: JSON.stringify(rfc3339) }]).notAfter, 1767225900);
});

test('what is missing or wrong is named, with the file', () => {
  const refused = (files, says) =>
    assert.throws(() => readClaim(files), (e) => e instanceof ClaimError && e.message.includes(says), says);
  refused([], 'Choose the claim file');
  refused([{ name: 'c.pem', text: CERT }], 'private key is missing');
  refused([{ name: 'k.pem', text: KEY }], 'certificate is missing');
  refused([{ name: 'notes.txt', text: 'hello' }], '“notes.txt” is neither a certificate nor a private key');
  refused([{ name: 'k.pem', text: '-----BEGIN ENCRYPTED PRIVATE KEY-----\nAA\n-----END ENCRYPTED PRIVATE KEY-----\n' }], 'password-protected');
  refused([{ name: 'x.json', text: '{"certificateId": 1' }], 'not valid JSON');
  refused([{ name: 'x.json', text: '{"thing": 1}' }], 'no certificatePem and keyPair.PrivateKey');
  refused([{ name: 'a.pem', text: CERT + KEY }, { name: 'b.pem', text: CERT }], 'second certificate');
  refused([{ name: 'k.pem', text: KEY + KEY }], '2 private keys');
  refused([{ name: 'big.pem', text: 'x'.repeat(70 * 1024) }], 'too large');
  const damaged = CERT.replace(/\n[A-Za-z0-9+/]{20}/, '\nAAAA');
  refused([{ name: 'c.pem', text: damaged }, { name: 'k.pem', text: KEY }], 'damaged');
});

test('certificateNotAfter reads the notAfter of a certificate (UTCTime)', () => {
  assert.equal(certificateNotAfter(CERT), NOT_AFTER);
});
