// Builds the browser consumer (src/browser.ts) into one dependency-free ES module: relayd serves
// it at /v1/client.js from relayd/web/static/relayd-client.js, which is checked in.
//   node build-browser.mjs [OUTFILE]   (default: ../../relayd/web/static/relayd-client.js)
// tests/test_js_build.py rebuilds into a temporary file and fails when the checked-in one differs.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = fileURLToPath(new URL(".", import.meta.url));
const outfile = process.argv[2] ?? `${here}../../relayd/web/static/relayd-client.js`;
const { version } = JSON.parse(readFileSync(`${here}package.json`, "utf8"));

await build({
  absWorkingDir: here, // the source-path comments in the output are relative to it
  entryPoints: [`${here}src/browser.ts`],
  outfile,
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  external: ["ws"], // never loaded in a browser: the global WebSocket is used
  legalComments: "none",
  charset: "utf8",
  logLevel: "warning",
  banner: {
    js: [
      `// relayd browser client ${version}: GENERATED from clients/js/src (browser.ts) by`,
      "// clients/js/build-browser.mjs. Do not edit: change the TypeScript source and run `npm run build`",
      "// in clients/js. Served by relayd at /v1/client.js; docs/clients.md, \"Browser client\".",
    ].join("\n"),
  },
});
