//! Throughput of the data pipeline on short chats: encode + pack, and the whole path from a Parquet file.
//!
//! ```text
//! cargo run --release -p datasets --example throughput [N]
//! ```
//! Uses the converted Mistral v3 tokenizer in tests/fixtures/tokenizers/ and writes a temporary Parquet file
//! of N short two-turn chats (default 50 000, a list-of-structs `messages` column as pyarrow writes it); then
//! encodes + packs the same chats with the tekken tokenizer in tests/fixtures/tekken/ (read natively, Nemo's
//! vocabulary cut to 10000 ranks, v3 layout), one thread as above.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Fields, Schema};
use datasets::{
    load, BatchConfig, Batches, Conversation, DataConfig, Dataset, Encoder, Message, Origin, PromptFormatChoice,
    Record, Role,
};

const TOPICS: [&str; 8] = ["the sea", "a cat", "the moon", "bread", "rain", "a violin", "mountains", "coffee"];

fn chat(i: usize) -> Vec<(Role, String)> {
    let t = TOPICS[i % TOPICS.len()];
    vec![
        (Role::User, format!("Tell me one short fact about {t}, please ({i}).")),
        (Role::Assistant, format!("Here is a fact about {t}: it is number {} on my list.", i % 97)),
        (Role::User, "Thanks! Another one?".to_string()),
        (Role::Assistant, format!("Sure: {t} appears in {} old songs.", i % 13 + 2)),
    ]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(50_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tok = tokenizers::Tokenizer::from_file(root.join("tests/fixtures/tokenizers/mistral-v3.tokenizer.json"))
        .map_err(|e| e.to_string())?;
    let enc = Encoder::new(&tok, PromptFormatChoice::Auto)?;
    let records: Vec<Record> = (0..n)
        .map(|i| {
            Record::Chat(Conversation {
                messages: chat(i).into_iter().map(|(r, c)| Message::new(r, c)).collect(),
                tools: vec![],
            })
        })
        .collect();

    // 0. the tokenizer alone, on the same message texts.
    if std::env::var_os("TOKENIZER_ONLY").is_some() {
        let t = Instant::now();
        let mut count = 0usize;
        for i in 0..n {
            for (_, c) in chat(i) {
                count += tok.encode_fast(c.as_str(), false).map_err(|e| e.to_string())?.len();
            }
        }
        let dt = t.elapsed().as_secs_f64();
        println!("tokenizer alone: {count} tokens in {dt:.2} s");
        use tokenizers::Model;
        let t = Instant::now();
        let mut count2 = 0usize;
        for i in 0..n {
            for (_, c) in chat(i) {
                let norm = format!("▁{}", c.replace(' ', "▁"));
                count2 += tok.get_model().tokenize(&norm).map_err(|e| e.to_string())?.len();
            }
        }
        let dt = t.elapsed().as_secs_f64();
        println!("model.tokenize alone: {count2} tokens in {dt:.2} s");
    }

    // 1. encode + pack, from records in memory.
    let cfg = encode_and_pack(&enc, &records, "sentencepiece v3")?;
    let tekken = datasets::load_tokenizer(&root.join("tests/fixtures/tekken/tekken-base.json"))?;
    let tekken_enc = Encoder::for_tokenizer(&tekken, PromptFormatChoice::Auto)?;
    encode_and_pack(&tekken_enc, &records, "tekken v3")?;

    // 2. the whole path from a Parquet file.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("chats.parquet");
    write_parquet(&path, n)?;
    let config = DataConfig { files: vec![path], ..DataConfig::default() };
    let t = Instant::now();
    let mut rows = 0usize;
    datasets::source::for_each_row(&config.files, config.format, &config.columns, |_| {
        rows += 1;
        Ok(true)
    })?;
    println!("read Parquet into rows only: {rows} rows in {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let loaded = load(&config, &enc, 0)?;
    let mut batches = Batches::new(loaded.train.clone(), cfg)?;
    for _ in 0..batches.batches_in_epoch() {
        batches.next_batch();
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "read Parquet + parse + encode + pack + batch: {} chats in {dt:.2} s = {:.0} examples/s",
        loaded.train.len(),
        n as f64 / dt
    );
    Ok(())
}

/// Encodes every record and packs them into batches, printing examples/s; returns the batch settings.
fn encode_and_pack(enc: &Encoder, records: &[Record], label: &str) -> Result<BatchConfig, Box<dyn std::error::Error>> {
    let n = records.len();
    let t = Instant::now();
    let file = Arc::new(PathBuf::from("memory"));
    let mut encoded = Vec::with_capacity(n);
    for (i, r) in records.iter().enumerate() {
        let e = enc.encode_record(r, true).map_err(|p| p.to_string())?;
        encoded.push((e, Origin { file: file.clone(), row: i as u64, is_line: false }));
    }
    let data = Arc::new(Dataset::from_examples(encoded));
    let cfg = BatchConfig {
        micro_batch_size: 4,
        max_seq_len: 2048,
        packing: true,
        shuffle: true,
        seed: 0,
        pad_id: enc.eos_id(),
        pad_to_multiple_of: 8,
    };
    let mut batches = Batches::new(data, cfg.clone())?;
    let nb = batches.batches_in_epoch();
    let mut tokens = 0usize;
    for _ in 0..nb {
        tokens += batches.next_batch().num_tokens();
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "{label}: encode + pack + batch (records in memory, one thread): {n} chats, {tokens} tokens, {nb} batches in \
         {dt:.2} s = {:.0} examples/s",
        n as f64 / dt
    );
    println!("packing: {:?}", batches.packing_stats());
    Ok(cfg)
}

fn write_parquet(path: &std::path::Path, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let msg_fields =
        Fields::from(vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)]);
    let mut list = ListBuilder::new(StructBuilder::from_fields(msg_fields.clone(), n * 4));
    for i in 0..n {
        for (role, content) in chat(i) {
            let s = list.values();
            s.field_builder::<StringBuilder>(0).ok_or("builder")?.append_value(role.name());
            s.field_builder::<StringBuilder>(1).ok_or("builder")?.append_value(content);
            s.append(true);
        }
        list.append(true);
    }
    let array: ArrayRef = Arc::new(list.finish());
    let schema = Arc::new(Schema::new(vec![Field::new("messages", array.data_type().clone(), true)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![array])?;
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path)?, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}
