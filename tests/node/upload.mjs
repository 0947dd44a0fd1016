// tus-js-client under Node uploads argv[3] to the tus endpoint argv[2]; options as JSON in argv[4]:
// {"chunkSize": N, "stopAfter": BYTES (abort once that much is acknowledged), "uploadUrl": URL (resume),
//  "metadata": {...}}.  Prints one JSON line: {"url", "offset", "done"} or {"error"}.
import fs from "node:fs";
import * as tus from "tus-js-client";

const [endpoint, path, optionsText] = process.argv.slice(2);
const options = JSON.parse(optionsText || "{}");
const size = fs.statSync(path).size;

const upload = new tus.Upload(fs.createReadStream(path), {
  endpoint,
  uploadUrl: options.uploadUrl || null,
  chunkSize: options.chunkSize || Infinity,
  uploadSize: size,
  retryDelays: [0, 200, 500, 1000],
  metadata: options.metadata || { filename: path.split("/").pop() },
  onChunkComplete(_chunk, accepted) {
    if (options.stopAfter && accepted >= options.stopAfter) {
      upload.abort().then(() => finish({ url: upload.url, offset: accepted, done: false }));
    }
  },
  onError(error) {
    finish({ error: String(error) });
  },
  onSuccess() {
    finish({ url: upload.url, offset: size, done: true });
  },
});

let finished = false;
function finish(result) {
  if (finished) return;
  finished = true;
  console.log(JSON.stringify(result));
  process.exit(result.error ? 1 : 0);
}

upload.start();
