// A prebake client in plain JavaScript, from the contract in proto/ alone (no generated
// code): look a key up, upload its files as blobs, publish the artifact, look it up again
// and fetch every file back, verifying each digest and the manifest digest.
//
//   npm ci && node client.js [HOST:PORT] [MODEL]
//
// HOST:PORT defaults to $PREBAKE_SERVER or 127.0.0.1:50051; MODEL (a Hugging Face style id)
// to example-org/node-example, so a second run against the same server finds a HIT at once.
// $PREBAKE_PROTO_DIR overrides where proto/ is (default: ../../proto from this file).
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const { xxh3 } = require("@node-rs/xxhash");

const PROTO_DIR = process.env.PREBAKE_PROTO_DIR || path.join(__dirname, "..", "..", "proto");
const SERVER = process.argv[2] || process.env.PREBAKE_SERVER || "127.0.0.1:50051";
const MODEL = process.argv[3] || "example-org/node-example";
const CHUNK = 1 << 20; // Write messages carry at most 4 MiB; Read sends about 1 MiB

// keepCase: the field names of the proto (`size_bytes`, `on_miss`), as the server's messages
// name them. longs: String, so an int64 never loses precision; enums: String, so answers
// read `LOOKUP_STATUS_HIT`. Enum values are *sent* by their full names too: proto-loader
// silently drops a name that is not one (`kind: "neuron"` arrives as unset).
const definition = protoLoader.loadSync(["prebake/v1/registry.proto", "prebake/v1/blobs.proto"], {
  includeDirs: [PROTO_DIR],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const v1 = grpc.loadPackageDefinition(definition).prebake.v1;

// The digest format of `Digest.hash` (blobs.proto): xxh3-128 with seed 0, the 128-bit
// value big-endian, as 32 lowercase hex digits zero-padded on the left. Without padStart
// one digest in 16 has 31 digits and the server refuses it.
function xxh3Hex(bytes) {
  return xxh3.xxh128(bytes, 0n).toString(16).padStart(32, "0");
}

function digestOf(bytes) {
  return { hash: xxh3Hex(bytes), size_bytes: String(bytes.length) };
}

// `Artifact.manifest_digest`: xxh3-128 of the compact JSON [[path,hash,size,executable],...]
// sorted by path.
function manifestDigest(files) {
  const entries = files
    .map((f) => [f.path, f.digest.hash, Number(f.digest.size_bytes), Boolean(f.executable)])
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return xxh3Hex(Buffer.from(JSON.stringify(entries), "utf8"));
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30_000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// Blobs.Write: the first message names the upload and the blob; the last sets finish_write.
function upload(blobs, bytes, uploadId) {
  return new Promise((resolve, reject) => {
    const stream = blobs.Write({ deadline: Date.now() + 60_000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
    const digest = digestOf(bytes);
    let offset = 0;
    do {
      const data = bytes.subarray(offset, offset + CHUNK);
      const first = offset === 0;
      stream.write({
        upload_id: first ? uploadId : "",
        digest: first ? digest : null,
        offset: String(offset),
        data,
        finish_write: offset + data.length === bytes.length,
      });
      offset += data.length;
    } while (offset < bytes.length);
    stream.end();
  });
}

// Blobs.Read from offset 0, every byte checked against the digest before it is used.
function download(blobs, digest) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const stream = blobs.Read({ digest, offset: "0", limit: "0" }, { deadline: Date.now() + 60_000 });
    stream.on("data", (reply) => chunks.push(reply.data));
    stream.on("error", reject);
    stream.on("end", () => {
      const bytes = Buffer.concat(chunks);
      const got = digestOf(bytes);
      if (got.hash !== digest.hash || got.size_bytes !== String(digest.size_bytes)) {
        reject(new Error(`blob ${digest.hash}/${digest.size_bytes} arrived as ${got.hash}/${got.size_bytes}`));
      } else {
        resolve(bytes);
      }
    });
  });
}

function exampleFiles() {
  // Deterministic content, so every run publishes the same file list (a re-publish is a no-op).
  const weights = Buffer.alloc(3 * CHUNK + 12345);
  let x = 2463534242;
  for (let i = 0; i < weights.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    weights[i] = x & 0xff;
  }
  return [
    { path: "config.json", bytes: Buffer.from(JSON.stringify({ model: MODEL, from: "node" }) + "\n"), executable: false },
    { path: "compiled/model.neff", bytes: weights, executable: false },
    { path: "bin/run.sh", bytes: Buffer.from("#!/bin/sh\necho run\n"), executable: true },
  ];
}

async function main() {
  const credentials = grpc.credentials.createInsecure();
  const registry = new v1.Registry(SERVER, credentials);
  const blobs = new v1.Blobs(SERVER, credentials);
  const key = {
    kind: "ARTIFACT_KIND_NEURON",
    model: MODEL,
    instance_type: "ml.inf2.48xlarge",
    sequence_length: "8192",
    batch_size: "8",
    tensor_parallel_degree: "24",
    precision: "bf16",
  };

  // A short name is not an enum name: it is sent as unset, and the server says what to send.
  try {
    await call(registry, "Lookup", { key: { ...key, kind: "neuron" }, on_miss: "ON_MISS_REPORT" });
    throw new Error("kind 'neuron' was accepted");
  } catch (err) {
    if (err.code !== grpc.status.INVALID_ARGUMENT) throw err;
    console.log(`short kind name refused: ${err.details}`);
  }

  const first = await call(registry, "Lookup", { key, on_miss: "ON_MISS_REPORT" });
  console.log(`lookup ${first.status} key ${first.key.digest}`);

  const files = exampleFiles().map((f) => ({ ...f, digest: digestOf(f.bytes) }));
  const missing = await call(blobs, "FindMissingBlobs", { digests: files.map((f) => f.digest) });
  const wanted = new Set(missing.missing.map((d) => `${d.hash}/${d.size_bytes}`));
  let uploaded = 0;
  for (const f of files) {
    if (!wanted.has(`${f.digest.hash}/${f.digest.size_bytes}`)) continue;
    const reply = await upload(blobs, f.bytes, `node-${process.pid}-${uploaded}`);
    if (!reply.complete) throw new Error(`upload of ${f.path} did not complete`);
    uploaded += 1;
  }
  console.log(`uploaded ${uploaded} of ${files.length} blobs`);

  const manifest = files.map((f) => ({ path: f.path, digest: f.digest, executable: f.executable }));
  const published = await call(registry, "PublishArtifact", {
    key,
    files: manifest,
    producer: { worker: "publish:node-example", note: "published by examples/node" },
  });
  console.log(`published ${published.artifact.artifact_id} created=${published.created}`);

  const hit = await call(registry, "Lookup", { key, on_miss: "ON_MISS_REPORT" });
  if (hit.status !== "LOOKUP_STATUS_HIT") throw new Error(`expected a HIT, got ${hit.status}`);
  const artifact = hit.artifact;
  console.log(`lookup ${hit.status} artifact ${artifact.artifact_id} (${artifact.match_reason || hit.match_reason})`);

  const expected = manifestDigest(artifact.files);
  if (expected !== artifact.manifest_digest) {
    throw new Error(`manifest digest ${artifact.manifest_digest}, computed ${expected}`);
  }
  console.log(`manifest digest ${expected} verified`);
  const byPath = new Map(files.map((f) => [f.path, f]));
  for (const f of artifact.files) {
    const bytes = await download(blobs, f.digest);
    if (!bytes.equals(byPath.get(f.path).bytes)) throw new Error(`${f.path} differs from what was published`);
    console.log(`fetched ${f.path} ${bytes.length} bytes ${f.digest.hash} verified`);
  }
  console.log(
    "RESULT " +
      JSON.stringify({
        artifact_id: artifact.artifact_id,
        key_digest: hit.key.digest,
        manifest_digest: artifact.manifest_digest,
        files: Object.fromEntries(artifact.files.map((f) => [f.path, f.digest.hash])),
      }),
  );
  registry.close();
  blobs.close();
}

main().catch((err) => {
  console.error(`error: ${err.code !== undefined ? `${grpc.status[err.code]}: ${err.details}` : err.stack}`);
  process.exit(1);
});
