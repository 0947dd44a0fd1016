// @tus/server (tus's own Node implementation) on an ephemeral port, storing under argv[2]; prints its port.
// The differential test sends it and pyfiledrop the same requests.
import http from "node:http";
import { Server } from "@tus/server";
import { FileStore } from "@tus/file-store";

const directory = process.argv[2];
const maxSize = Number(process.argv[3] || 0) || undefined;
const tus = new Server({ path: "/tus", datastore: new FileStore({ directory }), maxSize });
const server = http.createServer((req, res) => tus.handle(req, res));
server.listen(0, "127.0.0.1", () => {
  console.log(JSON.stringify({ port: server.address().port }));
});
