// ts_skills_check.mjs - the official TypeScript SDK client (2.x) lists, gets, reads and
// verifies the everything server's skills, in both eras.
//
//   node examples/ts_skills_check.mjs http://127.0.0.1:PORT/mcp
//
// Needs @modelcontextprotocol/client@^2.4 resolvable (NODE_PATH or a node_modules nearby).
// Prints one line per check and exits non-zero on the first failure.
import { Client, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";
import { SkillsClient } from "@modelcontextprotocol/client/ext/skills";

const url = new URL(process.argv[2] ?? "http://127.0.0.1:3001/mcp");

function check(ok, what) {
  if (!ok) {
    console.error(`FAIL ${what}`);
    process.exit(1);
  }
  console.log(`ok   ${what}`);
}

async function run(era) {
  const options = era === "legacy" ? {} : { versionNegotiation: { mode: { pin: "2026-07-28" } } };
  const client = new Client({ name: "ts-skills-check", version: "1.0.0" }, options);
  await client.connect(new StreamableHTTPClientTransport(url));
  const skills = new SkillsClient(client);
  check(skills.supported, `${era}: the server declares io.modelcontextprotocol/skills`);
  check(skills.directoryRead, `${era}: the server declares directoryRead`);
  const listing = await skills.list();
  check(listing.skills.length >= 1 && listing.invalid.length === 0, `${era}: skills/list gives ${listing.skills.length} valid entries`);
  for (const entry of listing.skills) {
    const { skill } = await skills.get(entry.uri);
    check(skill.uri === entry.uri, `${era}: skills/get ${entry.uri}`);
    const manifest = await skills.read(skill);
    check(manifest.verified && manifest.frontmatter?.name === skill.frontmatter.name,
      `${era}: SKILL.md of ${skill.frontmatter.name} read, size, digest and frontmatter verified`);
    for (const file of skill.resources) {
      if (file.uri === skill.uri) continue;
      const read = await skills.read(skill, file.uri);
      check(read.verified && read.bytes.length === file.size, `${era}: ${file.uri} verified`);
    }
    const root = skill.uri.slice(0, -"/SKILL.md".length);
    const dir = await skills.readDirectory(root);
    check(dir.resources.some((r) => r.uri === skill.uri), `${era}: resources/directory/read ${root}`);
  }
  await client.close();
}

await run("legacy");
await run("modern");
console.log("ts skills check: all passed");
