//! Loss masks per format, packing, batching, shuffling, resume, eval split, and every bad input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datasets::{
    load, load_files, BatchConfig, Batches, DataConfig, DataPosition, Dataset, Encoded, Encoder, Error, Format,
    OnInvalid, Origin, PromptFormatChoice, Truncation, IGNORE_INDEX,
};
use tokenizers::Tokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn tok(version: &str) -> Tokenizer {
    Tokenizer::from_file(fixtures().join(format!("tokenizers/mistral-{version}.tokenizer.json"))).unwrap()
}

fn encoder(version: &str) -> Encoder {
    Encoder::new(&tok(version), PromptFormatChoice::Auto).unwrap()
}

fn config(format: Format, files: Vec<PathBuf>) -> DataConfig {
    DataConfig { format, files, shuffle: false, ..DataConfig::default() }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The trained tokens as text runs (pieces joined, `▁` shown as a space).
fn trained_runs(enc: &Encoder, ids: &[u32], mask: &[bool]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = String::new();
    for (&id, &m) in ids.iter().zip(mask) {
        if m {
            cur.push_str(&enc.tokenizer().id_to_token(id).unwrap().replace('▁', " "));
        } else if !cur.is_empty() {
            runs.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs
}

fn err_string<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    r.expect_err("expected an error").to_string()
}

// ---------------------------------------------------------------- masks per format

#[test]
fn mask_text_format_trains_every_token_after_bos_and_the_eos() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "t.jsonl", "{\"text\": \"Hello world\"}\n");
    let enc = encoder("v1");
    let d = load_files(&[f], &config(Format::Text, vec![]), &enc, None).unwrap();
    let e = d.example(0);
    assert_eq!(e.input_ids.first(), Some(&enc.bos_id()));
    assert_eq!(e.input_ids.last(), Some(&enc.eos_id()));
    assert!(!e.loss_mask[0]);
    assert!(e.loss_mask[1..].iter().all(|m| *m));
    assert_eq!(trained_runs(&enc, e.input_ids, e.loss_mask), vec![" Hello world</s>"]);
}

#[test]
fn mask_instruct_formats_train_only_the_completion_and_eos() {
    let dir = tempfile::tempdir().unwrap();
    let pc = write(
        dir.path(),
        "pc.jsonl",
        "{\"prompt\": \"Say hi\", \"completion\": \"hi there\", \"system\": \"Be nice.\"}\n",
    );
    let alpaca = write(
        dir.path(),
        "alpaca.jsonl",
        "{\"instruction\": \"Translate\", \"input\": \"chat\", \"output\": \"cat\"}\n{\"instruction\": \"Count\", \"input\": \"\", \"output\": \"1 2 3\"}\n",
    );
    for v in ["v1", "v3"] {
        let enc = encoder(v);
        let d = load_files(std::slice::from_ref(&pc), &config(Format::Instruct, vec![]), &enc, None).unwrap();
        let e = d.example(0);
        assert_eq!(trained_runs(&enc, e.input_ids, e.loss_mask), vec![" hi there</s>"], "{v}");
        let d = load_files(std::slice::from_ref(&alpaca), &config(Format::Instruct, vec![]), &enc, None).unwrap();
        assert_eq!(trained_runs(&enc, d.example(0).input_ids, d.example(0).loss_mask), vec![" cat</s>"]);
        assert_eq!(trained_runs(&enc, d.example(1).input_ids, d.example(1).loss_mask), vec![" 1 2 3</s>"]);
    }
    // The Alpaca input follows the instruction after a blank line, exactly like a chat user turn would.
    let enc = encoder("v1");
    let d = load_files(&[alpaca], &config(Format::Instruct, vec![]), &enc, None).unwrap();
    let chat = enc
        .encode_conversation(&datasets::Conversation {
            messages: vec![
                datasets::Message::new(datasets::Role::User, "Translate\n\nchat"),
                datasets::Message::new(datasets::Role::Assistant, "cat"),
            ],
            tools: vec![],
        })
        .unwrap();
    assert_eq!(d.example(0).input_ids, &chat.input_ids[..]);
}

#[test]
fn mask_chat_trains_every_assistant_turn_except_weight_zero() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "c.jsonl",
        r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "weight": 0}, {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3", "weight": 1}]}"#,
    );
    for v in ["v1", "v3"] {
        let enc = encoder(v);
        let d = load_files(std::slice::from_ref(&f), &config(Format::Chat, vec![]), &enc, None).unwrap();
        let e = d.example(0);
        assert_eq!(trained_runs(&enc, e.input_ids, e.loss_mask), vec![" a1</s>", " a3</s>"], "{v}");
    }
}

#[test]
fn mask_tools_trains_the_call_payload_not_the_tool_list_or_results() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "tools.jsonl",
        r#"{"tools": "[{\"type\": \"function\", \"function\": {\"name\": \"add\", \"description\": \"Add\", \"parameters\": {}}}]", "messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "function": {"name": "add", "arguments": {"a": 1, "b": 1}}}]}, {"role": "tool", "tool_call_id": "abcdefghi", "content": "2"}, {"role": "assistant", "content": "It is 2."}]}"#,
    );
    let enc = encoder("v3");
    let d = load_files(&[f], &config(Format::Tools, vec![]), &enc, None).unwrap();
    let e = d.example(0);
    assert_eq!(
        trained_runs(&enc, e.input_ids, e.loss_mask),
        vec![
            r#"[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 1}, "id": "abcdefghi"}]</s>"#,
            " It is 2.</s>"
        ]
    );
}

#[test]
fn mask_tokens_format_from_labels_or_loss_mask() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "tok.jsonl",
        "{\"input_ids\": [1, 10, 11, 12, 2], \"labels\": [-100, -100, 11, 12, 2]}\n\
         {\"input_ids\": [1, 20, 21], \"loss_mask\": [1, 0, 1]}\n\
         {\"input_ids\": [1, 30, 31]}\n",
    );
    let d = load_files(&[f], &config(Format::Tokens, vec![]), &encoder("v1"), None).unwrap();
    assert_eq!(d.example(0).loss_mask, &[false, false, true, true, true]);
    assert_eq!(d.example(0).labels(), vec![-100, -100, 11, 12, 2]);
    // The first token of a document is never a target, whatever the data says.
    assert_eq!(d.example(1).loss_mask, &[false, false, true]);
    assert_eq!(d.example(2).loss_mask, &[false, true, true]);
}

// ---------------------------------------------------------------- Parquet flavours

#[test]
fn parquet_flavours_large_lists_views_dictionaries_zstd() {
    let f = fixtures().join("datasets/flavours.parquet");
    let enc = encoder("v1");
    let chat = load_files(std::slice::from_ref(&f), &config(Format::Chat, vec![]), &enc, None).unwrap();
    assert_eq!(chat.len(), 2);
    assert_eq!(trained_runs(&enc, chat.example(1).input_ids, chat.example(1).loss_mask), vec![" 4</s>"]);
    let text = load_files(std::slice::from_ref(&f), &config(Format::Text, vec![]), &enc, None).unwrap();
    assert_eq!(trained_runs(&enc, text.example(0).input_ids, text.example(0).loss_mask), vec![" plain text one</s>"]);
    let inst = load_files(&[f], &config(Format::Instruct, vec![]), &enc, None).unwrap();
    assert_eq!(trained_runs(&enc, inst.example(1).input_ids, inst.example(1).loss_mask), vec![" bye</s>"]);
}

#[test]
fn several_files_and_directories_read_in_order_with_limit() {
    let dir = tempfile::tempdir().unwrap();
    let line = |i: usize| format!("{{\"text\": \"doc {i}\"}}\n");
    write(dir.path(), "b.jsonl", &(3..6).map(line).collect::<String>());
    write(dir.path(), "a.jsonl", &(0..3).map(line).collect::<String>());
    write(dir.path(), "notes.txt", "ignored");
    let enc = encoder("v1");
    let cfg = DataConfig { limit: Some(5), ..config(Format::Text, vec![dir.path().to_path_buf()]) };
    let data = load(&cfg, &enc, 0).unwrap();
    assert_eq!(data.train.len(), 5);
    assert_eq!(data.train.stats.files.len(), 2);
    assert!(data.train.example(0).origin.file.ends_with("a.jsonl"));
    assert_eq!(data.train.example(4).origin.row, 2, "JSON lines are numbered from 1");
}

// ---------------------------------------------------------------- packing and batches

fn synthetic(lens: &[usize]) -> Arc<Dataset> {
    let file = Arc::new(PathBuf::from("synthetic"));
    Arc::new(Dataset::from_examples(lens.iter().enumerate().map(|(i, &n)| {
        let ids: Vec<u32> = (0..n as u32).map(|k| 1000 * (i as u32 + 1) + k).collect();
        let mut mask = vec![true; n];
        mask[0] = false;
        (Encoded { input_ids: ids, loss_mask: mask }, Origin { file: file.clone(), row: i as u64, is_line: false })
    })))
}

fn bcfg(mbs: usize, max: usize, packing: bool, shuffle: bool) -> BatchConfig {
    BatchConfig { micro_batch_size: mbs, max_seq_len: max, packing, shuffle, seed: 7, pad_id: 2, pad_to_multiple_of: 1 }
}

#[test]
fn packing_keeps_documents_apart_and_restarts_positions() {
    let lens = [5, 9, 3, 7, 2, 12, 4, 6, 8, 1, 10, 3];
    let data = synthetic(&lens);
    let mut b = Batches::new(data.clone(), bcfg(2, 16, true, true)).unwrap();
    let n_batches = b.batches_in_epoch();
    let mut seen = vec![0usize; lens.len()];
    for _ in 0..n_batches {
        let batch = b.next_batch();
        assert_eq!(batch.input_ids.len(), batch.batch_size * batch.seq_len);
        for r in 0..batch.batch_size {
            assert!(batch.row_lengths[r] <= 16);
            for span in &batch.docs[r] {
                seen[span.example] += 1;
                let e = data.example(span.example);
                for k in 0..span.len {
                    let t = r * batch.seq_len + span.start + k;
                    assert_eq!(batch.input_ids[t], e.input_ids[k]);
                    assert_eq!(batch.positions[t], k as u32, "positions restart per document");
                }
            }
            // Padding: label -100, own document id, never attended by real tokens.
            for t in batch.row_lengths[r]..batch.seq_len {
                assert_eq!(batch.labels[r * batch.seq_len + t], IGNORE_INDEX);
                for q in 0..batch.row_lengths[r] {
                    assert!(!batch.attends(r, q, t));
                }
            }
        }
        // Next-token targets never cross a document boundary.
        let targets = batch.targets();
        for r in 0..batch.batch_size {
            for span in &batch.docs[r] {
                let last = r * batch.seq_len + span.start + span.len - 1;
                assert_eq!(targets[last], IGNORE_INDEX);
            }
        }
    }
    assert!(seen.iter().all(|&c| c == 1), "every example exactly once per epoch: {seen:?}");
    assert_eq!(b.position().epoch, 1);
}

/// A toy one-layer attention with rotary-style positions, run on a packed row (block-diagonal causal mask from
/// `doc_ids`, positions from `positions`) and on each document alone: the outputs are identical, so the batch
/// metadata is all an engine needs to keep packed examples independent. (The real-model check lives with the
/// engine's tests.)
#[test]
fn packed_rows_give_the_same_outputs_as_documents_alone() {
    fn embed(id: u32, pos: u32, d: usize) -> Vec<f64> {
        (0..d)
            .map(|j| {
                let x = ((id as f64) * 0.37 + j as f64 * 1.3).sin();
                let angle = pos as f64 / 10f64.powf(j as f64 / d as f64);
                if j % 2 == 0 {
                    x * angle.cos()
                } else {
                    x * angle.sin() + 0.5 * x
                }
            })
            .collect()
    }
    fn attention(ids: &[u32], pos: &[u32], allowed: &dyn Fn(usize, usize) -> bool) -> Vec<Vec<f64>> {
        let d = 8;
        let h: Vec<Vec<f64>> = ids.iter().zip(pos).map(|(&i, &p)| embed(i, p, d)).collect();
        (0..ids.len())
            .map(|q| {
                let scores: Vec<(usize, f64)> = (0..ids.len())
                    .filter(|&k| allowed(q, k))
                    .map(|k| (k, h[q].iter().zip(&h[k]).map(|(a, b)| a * b).sum::<f64>()))
                    .collect();
                let max = scores.iter().map(|s| s.1).fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s.1 - max).exp()).sum();
                let mut out = vec![0.0; d];
                for (k, s) in &scores {
                    let w = (s - max).exp() / z;
                    for j in 0..d {
                        out[j] += w * h[*k][j];
                    }
                }
                out
            })
            .collect()
    }
    let data = synthetic(&[6, 4, 5, 3, 7]);
    let mut packed = Batches::new(data.clone(), bcfg(1, 32, true, false)).unwrap();
    let batch = packed.next_batch();
    assert!(batch.docs[0].len() >= 3, "several documents share the row");
    let t = batch.seq_len;
    let out = attention(&batch.input_ids[..t], &batch.positions[..t], &|q, k| batch.attends(0, q, k));
    for span in &batch.docs[0] {
        let e = data.example(span.example);
        let pos: Vec<u32> = (0..e.input_ids.len() as u32).collect();
        let alone = attention(e.input_ids, &pos, &|q, k| k <= q);
        for k in 0..span.len {
            for j in 0..8 {
                assert!((out[span.start + k][j] - alone[k][j]).abs() < 1e-12);
            }
        }
    }
}

#[test]
fn padding_mode_pads_to_the_longest_row_and_eos_stays_trained_when_pad_is_eos() {
    let enc = encoder("v1");
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "t.jsonl", "{\"text\": \"a\"}\n{\"text\": \"a much longer document here\"}\n");
    let d = Arc::new(load_files(&[f], &config(Format::Text, vec![]), &enc, None).unwrap());
    let cfg = BatchConfig { pad_id: enc.eos_id(), ..bcfg(2, 64, false, false) };
    let batch = Batches::new(d.clone(), cfg).unwrap().next_batch();
    assert_eq!(batch.batch_size, 2);
    assert_eq!(batch.seq_len, d.example_len(1));
    // Row 0: [<s>, a, </s>, pad...]: the real </s> is a label, the padding (also </s>) is not.
    assert_eq!(batch.labels[2], i64::from(enc.eos_id()));
    assert!(batch.labels[3..batch.seq_len].iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(batch.input_ids[3], enc.eos_id());
    assert_eq!(batch.targets()[1], i64::from(enc.eos_id()), "the token before </s> predicts </s>");
    assert_eq!(batch.num_targets(), 2 + (d.example_len(1) - 1));
}

#[test]
fn shuffling_is_deterministic_and_differs_per_epoch() {
    let data = synthetic(&[3; 40]);
    let order = |seed: u64, epoch_batches: usize| -> Vec<usize> {
        let mut b = Batches::new(data.clone(), BatchConfig { seed, ..bcfg(1, 3, false, true) }).unwrap();
        (0..epoch_batches).map(|_| b.next_batch().docs[0][0].example).collect()
    };
    assert_eq!(order(1, 80), order(1, 80));
    assert_ne!(order(1, 40), order(2, 40));
    let two = order(1, 80);
    assert_ne!(two[..40], two[40..], "each epoch is reshuffled");
    let mut e1 = two[40..].to_vec();
    e1.sort();
    assert_eq!(e1, (0..40).collect::<Vec<_>>());
}

#[test]
fn resume_from_any_position_continues_exactly() {
    let lens: Vec<usize> = (0..30).map(|i| 1 + (i * 7) % 11).collect();
    let data = synthetic(&lens);
    let cfg = bcfg(3, 16, true, true);
    let mut full = Batches::new(data.clone(), cfg.clone()).unwrap();
    let reference: Vec<_> = (0..25).map(|_| full.next_batch()).collect();
    for stop in [0, 1, 2, 5, 7, 11, 13, 24] {
        let mut run = Batches::new(data.clone(), cfg.clone()).unwrap();
        for _ in 0..stop {
            run.next_batch();
        }
        // The position goes through a checkpoint as JSON.
        let saved = serde_json::to_string(&run.position()).unwrap();
        let pos: DataPosition = serde_json::from_str(&saved).unwrap();
        let mut resumed = Batches::resume(data.clone(), cfg.clone(), pos).unwrap();
        for (k, want) in reference.iter().enumerate().skip(stop) {
            assert_eq!(&resumed.next_batch(), want, "stopped at {stop}, batch {k}");
        }
    }
    // Another seed (or other data) refuses the position.
    let pos = full.position();
    let other = BatchConfig { seed: 8, ..cfg };
    let e = err_string(Batches::resume(data, other, pos));
    assert!(e.contains("changed since the checkpoint"), "{e}");
}

#[test]
fn eval_split_is_deterministic_and_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "t.jsonl", &(0..50).map(|i| format!("{{\"text\": \"doc {i}\"}}\n")).collect::<String>());
    let enc = encoder("v1");
    let cfg = DataConfig { eval_fraction: 0.2, ..config(Format::Text, vec![f]) };
    let a = load(&cfg, &enc, 3).unwrap();
    let b = load(&cfg, &enc, 3).unwrap();
    let c = load(&cfg, &enc, 4).unwrap();
    let eval_rows =
        |d: &datasets::LoadedData| -> Vec<u64> { d.eval.as_ref().unwrap().iter().map(|e| e.origin.row).collect() };
    assert_eq!(eval_rows(&a).len(), 10);
    assert_eq!(a.train.len(), 40);
    assert_eq!(a.train.stats.held_out, 10);
    assert_eq!(eval_rows(&a), eval_rows(&b));
    assert_ne!(eval_rows(&a), eval_rows(&c));
    let mut all: Vec<u64> = a.train.iter().map(|e| e.origin.row).chain(eval_rows(&a)).collect();
    all.sort();
    assert_eq!(all, (1..=50).collect::<Vec<u64>>());
}

// ---------------------------------------------------------------- bad input

#[test]
fn error_missing_column_lists_the_columns_found() {
    let f = fixtures().join("datasets/flavours.parquet");
    let cfg = DataConfig {
        columns: datasets::Columns { messages: "conversations".into(), ..Default::default() },
        ..config(Format::Chat, vec![])
    };
    let e = err_string(load_files(&[f], &cfg, &encoder("v1"), None));
    assert!(e.contains("flavours.parquet: no column `conversations`"), "{e}");
    assert!(e.contains("columns found: messages, text, prompt, completion"), "{e}");
    assert!(e.contains("data.columns.messages"), "{e}");
}

#[test]
fn error_wrong_column_type_names_expected_and_found() {
    let f = fixtures().join("datasets/wrong_type.parquet");
    let e = err_string(load_files(&[f], &config(Format::Chat, vec![]), &encoder("v1"), None));
    assert!(e.contains("wrong_type.parquet: column `messages` has type Int64; expected a list of structs"), "{e}");
}

#[test]
fn error_null_rows_stop_or_are_counted() {
    let f = fixtures().join("datasets/null_row.parquet");
    let e = err_string(load_files(std::slice::from_ref(&f), &config(Format::Chat, vec![]), &encoder("v1"), None));
    assert!(e.contains("null_row.parquet row 1: column `messages` is null"), "{e}");
    let cfg = DataConfig { on_invalid: OnInvalid::Skip, ..config(Format::Chat, vec![]) };
    let d = load_files(&[f], &cfg, &encoder("v1"), None).unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d.stats.skipped_null, 2);
    assert_eq!(d.stats.rows, 4);
    assert!(d.stats.skip_examples[1].contains("row 2: column `messages` element 0: field `role`"), "{:?}", d.stats);
}

#[test]
fn error_empty_dataset() {
    let cfg = config(Format::Chat, vec![fixtures().join("datasets/empty.parquet")]);
    let e = err_string(load(&cfg, &encoder("v1"), 0));
    assert!(e.starts_with("empty dataset: no usable examples in"), "{e}");
    assert!(e.contains("0 rows read"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = err_string(load(&config(Format::Chat, vec![dir.path().to_path_buf()]), &encoder("v1"), 0));
    assert!(e.contains("the directory holds no .parquet, .jsonl or .json files"), "{e}");
}

#[test]
fn error_bad_role_names_file_row_element_and_suggests() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "data.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assitant\", \"content\": \"b\"}]}\n",
    );
    let e = err_string(load_files(&[f], &config(Format::Chat, vec![]), &encoder("v1"), None));
    assert!(
        e.ends_with(
            "data.jsonl line 2: column `messages` element 1: role `assitant` is not one of \
                     system/user/assistant/tool (did you mean `assistant`?)"
        ),
        "{e}"
    );
}

#[test]
fn error_conversation_structure() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]"#,
            "ends with a user message; a training conversation must end with an assistant message",
        ),
        (
            r#"[{"role": "user", "content": "a"}, {"role": "tool", "content": "x", "tool_call_id": "abcdefghi"}, {"role": "assistant", "content": "b"}]"#,
            "message 1: a tool message cannot follow a user message",
        ),
        (
            r#"[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "c"}]"#,
            "message 2: a system message cannot follow an assistant message",
        ),
        (
            r#"[{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "1", "tool_call_id": "zzzzzzzzz"}, {"role": "assistant", "content": "b"}]"#,
            "tool result for id `zzzzzzzzz` matches no call of the preceding assistant message (call ids: abcdefghi)",
        ),
        (
            r#"[{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]"#,
            "message 1: an assistant message needs either content or tool_calls (it has neither)",
        ),
        (r#"[]"#, "the conversation has no messages"),
    ];
    let enc = encoder("v3");
    for (i, (messages, want)) in cases.iter().enumerate() {
        let f = write(dir.path(), &format!("c{i}.jsonl"), &format!("{{\"messages\": {messages}}}\n"));
        let e = err_string(load_files(&[f], &config(Format::Chat, vec![]), &enc, None));
        assert!(e.contains(&format!("c{i}.jsonl line 1: ")) && e.contains(want), "{e}\nwanted: {want}");
    }
}

#[test]
fn error_too_long_examples_follow_the_truncation_policy() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "t.jsonl", "{\"text\": \"short\"}\n{\"text\": \"this one is certainly far too long\"}\n");
    let enc = encoder("v1");
    let base = DataConfig { max_seq_len: 5, ..config(Format::Text, vec![f.clone()]) };
    let e = err_string(load(&DataConfig { truncation: Truncation::Error, ..base.clone() }, &enc, 0));
    assert!(e.contains("t.jsonl line 2: the example has") && e.contains("more than data.max_seq_len = 5"), "{e}");
    let d = load(&base, &enc, 0).unwrap();
    assert_eq!((d.train.len(), d.train.stats.dropped_too_long), (1, 1));
    let d = load(&DataConfig { truncation: Truncation::Truncate, ..base }, &enc, 0).unwrap();
    assert_eq!((d.train.len(), d.train.stats.truncated, d.train.example_len(1)), (2, 1, 5));
}

#[test]
fn error_corrupt_and_non_parquet_files() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = write(dir.path(), "bogus.parquet", "this is not parquet at all");
    let e = err_string(load_files(&[bogus], &config(Format::Chat, vec![]), &encoder("v1"), None));
    assert!(e.contains("bogus.parquet: not a readable Parquet file"), "{e}");
    let good = std::fs::read(fixtures().join("datasets/chat_v1.parquet")).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let e = err_string(load_files(&[cut], &config(Format::Chat, vec![]), &encoder("v1"), None));
    assert!(e.contains("cut.parquet: not a readable Parquet file"), "{e}");
    let missing = dir.path().join("nope.parquet");
    let e = err_string(load(&config(Format::Chat, vec![missing]), &encoder("v1"), 0));
    assert!(e.contains("nope.parquet: No such file"), "{e}");
    let bad_json = write(dir.path(), "bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": oops}\n");
    let e = err_string(load_files(&[bad_json], &config(Format::Text, vec![]), &encoder("v1"), None));
    assert!(e.contains("bad.jsonl:2: invalid JSON"), "{e}");
}

#[test]
fn error_zero_sizes_are_refused() {
    let f = fixtures().join("datasets/chat_v1.parquet");
    let e =
        err_string(load(&DataConfig { max_seq_len: 0, ..config(Format::Chat, vec![f.clone()]) }, &encoder("v1"), 0));
    assert!(e.contains("data.max_seq_len: must be at least 1"), "{e}");
    let e = err_string(load(&DataConfig { eval_fraction: 1.5, ..config(Format::Chat, vec![f]) }, &encoder("v1"), 0));
    assert!(e.contains("data.eval_fraction: must be in [0, 1)"), "{e}");
    let e = err_string(Batches::new(synthetic(&[3]), bcfg(0, 8, true, false)));
    assert!(e.contains("train.micro_batch_size: must be at least 1"), "{e}");
}

#[test]
fn throughput_smoke_encode_and_pack() {
    // A quick sanity run (the full benchmark is `cargo run -p datasets --example throughput`).
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..2000 {
        text.push_str(&format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is {i} plus {i}?\"}}, {{\"role\": \"assistant\", \"content\": \"It is {}.\"}}]}}\n",
            2 * i
        ));
    }
    let f = write(dir.path(), "many.jsonl", &text);
    let enc = encoder("v3");
    let t = std::time::Instant::now();
    let d = load(&config(Format::Chat, vec![f]), &enc, 0).unwrap();
    let b = Batches::new(d.train.clone(), bcfg(8, 2048, true, true)).unwrap();
    let stats = b.packing_stats();
    assert_eq!(d.train.len(), 2000);
    assert!(stats.efficiency > 0.95, "{stats:?}");
    eprintln!("2000 chats encoded and packed in {:?}", t.elapsed());
}
