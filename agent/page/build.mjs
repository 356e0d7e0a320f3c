// Builds the installer's page into one self-contained file, dist/index.html: src/index.html with
// src/main.js and its imports (noble's libraries from node_modules, pinned by the lockfile)
// bundled and minified by esbuild into its <script>. The result is committed; iotd embeds it
// (gzip-compressed by agent/build.rs), so building iotd needs neither node nor npm.
//
//   node build.mjs          writes dist/index.html
//   node build.mjs --check  builds in memory and fails if dist/index.html differs (make test)

import { build } from 'esbuild';
import { readFileSync, writeFileSync } from 'node:fs';

const here = new URL('./', import.meta.url);
const check = process.argv.includes('--check');

// The page's client id is web/<iotd's version>, from the workspace manifest.
const manifest = readFileSync(new URL('../../Cargo.toml', here), 'utf8');
const version = /^\[workspace\.package\][\s\S]*?^version\s*=\s*"([^"]+)"/m.exec(manifest)?.[1];
if (!version) throw new Error('no [workspace.package] version in Cargo.toml');

const bundled = await build({
  entryPoints: [new URL('src/main.js', here).pathname],
  bundle: true,
  minify: true,
  format: 'iife',
  // Phones from about 2020 on: BigInt, optional chaining, async/await.
  target: ['es2020'],
  define: { CLIENT_VERSION: JSON.stringify(version) },
  legalComments: 'eof',
  charset: 'utf8',
  write: false,
  logLevel: 'warning',
});
let script = bundled.outputFiles[0].text;
// Inlined in <script>: "</script" inside would end it early.
script = script.replaceAll('</script', '<\\/script');

const template = readFileSync(new URL('src/index.html', here), 'utf8');
const marker = '<script>/*BUNDLE*/</script>';
if (template.split(marker).length !== 2) throw new Error(`src/index.html needs exactly one ${marker}`);
const page = template.replace(marker, () => `<script>${script}</script>`);

const target = new URL('dist/index.html', here);
if (check) {
  let committed = '';
  try {
    committed = readFileSync(target, 'utf8');
  } catch {
    // Missing: reported as a difference below.
  }
  if (committed !== page) {
    console.error(
      'agent/page/dist/index.html is not what the sources and the lockfile build: run `node agent/page/build.mjs` (after `npm ci` in agent/page) and commit the result',
    );
    process.exit(1);
  }
  console.log(`agent/page/dist/index.html matches its sources (${page.length} bytes)`);
} else {
  writeFileSync(target, page);
  console.log(`wrote agent/page/dist/index.html (${page.length} bytes)`);
}
