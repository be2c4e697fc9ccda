"""Output for people: text tables and sentences (`text`), and the self-contained HTML report
(`html`). Both are pure renderings of data others measured and judged."""
